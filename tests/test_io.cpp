#include <catch2/catch.hpp>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include <pkm/io/checkpoint.hpp>
#include <pkm/io/parity.hpp>
#include <pkm/pkm.hpp>

#include "files.hpp"
#include "golden.hpp"
#include "support.hpp"

#ifndef PKM_TEST_DATA
#error "PKM_TEST_DATA must name tests/data"
#endif

using Catch::Contains;
using pkm::io::SafetensorsFile;

namespace {
std::string data(const std::string& file) { return std::string(PKM_TEST_DATA) + "/" + file; }

const char* kCases[] = {"memplus",  "plain",       "noproj",       "gated",
                        "noqbias",  "qknorm",      "qknorm_scale", "heads1_knn1",
                        "knn_all",  "bf16_values", "random_0",     "random_1",
                        "random_2", "random_3",    "random_4",     "random_5"};

SafetensorsFile as_file(const pkm::io::ParityResult& r) {
  return SafetensorsFile::from_bytes(r.writer().to_bytes(), "pkm output");
}

using pkmtest::raw_file;
using pkmtest::read_error;

std::string temp_path(const std::string& name) { return "pkm_test_" + name + ".safetensors"; }
}  // namespace

TEST_CASE("pkm matches PyTorch autograd on every golden case", "[io][golden]") {
  for (const char* name : kCases) {
    const std::string n = name;
    const SafetensorsFile ckpt(data(n + ".checkpoint.safetensors")),
        in(data(n + ".input.safetensors")), expected(data(n + ".expected.safetensors"));
    const auto result = pkm::io::run_parity(ckpt, in);
    const auto report = pkmtest::compare_parity(expected, as_file(result));
    INFO(n << ": worst relative error " << report.worst_rel << " in " << report.worst_tensor << ", "
           << report.tied_positions << " tied index positions");
    for (const auto& f : report.failures) INFO(f);
    CHECK(report.failures.empty());
    CHECK(report.tied_positions == 0);
    CHECK(expected.tensors().size() >= 7);  // y, indices, scores, dx and the gradients
  }
}

TEST_CASE("a BF16 value table loads as BF16 or converts to float", "[io][golden]") {
  const SafetensorsFile ckpt(data("bf16_values.checkpoint.safetensors")),
      in(data("bf16_values.input.safetensors")), expected(data("bf16_values.expected.safetensors"));
  REQUIRE(ckpt.info("values.weight").dtype == pkm::io::Dtype::bf16);
  auto as_bf16 = pkm::io::load_layer<float, pkm::bf16>(ckpt);
  auto as_f32 = pkm::io::load_layer<float, float>(ckpt);
  const pkm::RowMatrix<float> x = [&] {
    pkm::RowMatrix<float> m(in.info("x").shape[0], in.info("x").shape[1]);
    in.read("x", m.data(), m.size());
    return m;
  }();
  pkm::ForwardCache<float> c1, c2;
  const pkm::RowMatrix<float> y16 = as_bf16.forward(x, c1), y32 = as_f32.forward(x, c2);
  const auto ey = expected.read<float>("y");
  const pkm::RowMatrix<float> yref =
      Eigen::Map<const pkm::RowMatrix<float>>(ey.data(), y16.rows(), y16.cols());
  CHECK(c1.indices == c2.indices);
  CHECK((y16 - yref).cwiseAbs().maxCoeff() <= 1e-5f * yref.cwiseAbs().maxCoeff());
  CHECK((y32 - yref).cwiseAbs().maxCoeff() <= 1e-5f * yref.cwiseAbs().maxCoeff());
  // Saving the BF16 layer writes BF16 values, bit for bit.
  pkm::io::save_layer(temp_path("bf16"), as_bf16);
  const SafetensorsFile back(temp_path("bf16"));
  CHECK(back.info("values.weight").dtype == pkm::io::Dtype::bf16);
  const auto a = ckpt.read<pkm::bf16>("values.weight"), b = back.read<pkm::bf16>("values.weight");
  CHECK(std::memcmp(a.data(), b.data(), a.size() * 2) == 0);
  std::remove(temp_path("bf16").c_str());
}

TEST_CASE("save then load gives back the same layer, bit for bit", "[io]") {
  auto c = pkmtest::small_config();
  c.gating = true;
  c.qk_norm = true;
  c.qk_norm_scale = 1.0 / 3.0;  // needs all 17 digits to round-trip
  pkm::MemoryLayer<double> layer(c, 9);
  pkm::io::save_layer(temp_path("rt"), layer, {{"note", "from pkm"}});
  const SafetensorsFile f(temp_path("rt"));
  CHECK(f.metadata().at("mem_knn") == "3");
  CHECK(f.metadata().at("qk_norm") == "true");
  CHECK(f.metadata().at("note") == "from pkm");
  CHECK(f.info("values.weight").dtype == pkm::io::Dtype::f64);
  CHECK(f.info("query_proj.query_mlps.0.bias").shape ==
        std::vector<std::int64_t>{c.heads * c.k_dim});
  auto back = pkm::io::load_layer<double>(f);
  CHECK(back.config() == c);
  for (int t = 0; t < pkm::kNumTensors; ++t) {
    if (!layer.params().has(pkm::Tensor(t))) continue;
    CHECK(layer.params().matrix(pkm::Tensor(t)) == back.params().matrix(pkm::Tensor(t)));
  }
  CHECK(layer.values().matrix() == back.values().matrix());
  CHECK(f.metadata().count("score_activation") == 0);  // softmax: the file is as it was
  std::remove(temp_path("rt").c_str());
}

TEST_CASE("a ReLU layer's checkpoint says so, and loads as ReLU", "[io]") {
  auto c = pkmtest::small_config();
  c.score_activation = pkm::ScoreActivation::relu;
  pkm::MemoryLayer<double> layer(c, 19);
  pkm::io::save_layer(temp_path("relu"), layer);
  const SafetensorsFile f(temp_path("relu"));
  CHECK(f.metadata().at("score_activation") == "relu");
  const auto back = pkm::io::load_layer<double>(f);
  CHECK(back.config() == c);
  pkm::io::LoadOptions o;
  o.score_activation = pkm::ScoreActivation::softmax;  // the caller's word wins
  CHECK(pkm::io::infer_config(f, o).score_activation == pkm::ScoreActivation::softmax);
  std::remove(temp_path("relu").c_str());

  // An activation pkm does not know is refused, naming the key, the value and the choices.
  pkm::io::SafetensorsWriter w;
  std::vector<std::vector<double>> keep;
  for (const auto& t : f.tensors()) {
    keep.push_back(f.read<double>(t.name));
    w.add(t.name, t.shape, keep.back().data());
  }
  w.set_metadata("mem_knn", "3");
  w.set_metadata("score_activation", "gelu");
  CHECK_THROWS_WITH(pkm::io::infer_config(SafetensorsFile::from_bytes(w.to_bytes(), "act.st")),
                    Contains("act.st") && Contains("\"score_activation\" = \"gelu\"") &&
                        Contains("expected \"softmax\" or \"relu\""));
}

TEST_CASE("options win over metadata, and knn must come from one of them", "[io]") {
  const SafetensorsFile f(data("memplus.checkpoint.safetensors"));
  CHECK(pkm::io::infer_config(f).knn == 4);
  pkm::io::LoadOptions o;
  o.knn = 2;
  o.qk_norm = true;
  o.qk_norm_scale = 3.0;
  const auto c = pkm::io::infer_config(f, o);
  CHECK(c.knn == 2);
  CHECK(c.qk_norm);
  CHECK(c.effective_qk_norm_scale() == 3.0);
  CHECK(c.heads == 4);
  CHECK(c.n_keys == 8);
  CHECK(c.k_dim == 8);
  CHECK(c.input_dim == 16);
  CHECK(c.v_dim == 12);
  CHECK(c.output_dim == 16);
  CHECK(c.memory_plus);
  CHECK_FALSE(c.gating);
  o.knn = 9;  // more than n_keys
  CHECK_THROWS_WITH(pkm::io::infer_config(f, o),
                    Contains("knn = 9") && Contains("memplus.checkpoint"));

  // The same tensors without metadata: knn is required.
  pkm::io::SafetensorsWriter w;
  std::vector<std::vector<float>> keep;
  for (const auto& t : f.tensors()) {
    keep.push_back(f.read<float>(t.name));
    w.add(t.name, t.shape, keep.back().data());
  }
  const auto bare = SafetensorsFile::from_bytes(w.to_bytes(), "bare.safetensors");
  CHECK_THROWS_WITH(pkm::io::infer_config(bare),
                    Contains("mem_knn") && Contains("bare.safetensors"));
  pkm::io::LoadOptions k3;
  k3.knn = 3;
  CHECK(pkm::io::infer_config(bare, k3).knn == 3);
  w.set_metadata("mem_knn", "four");
  CHECK_THROWS_WITH(pkm::io::infer_config(SafetensorsFile::from_bytes(w.to_bytes(), "m")),
                    Contains("not an integer"));
  w.set_metadata("mem_knn", "4");
  w.set_metadata("qk_norm", "maybe");
  CHECK_THROWS_WITH(pkm::io::infer_config(SafetensorsFile::from_bytes(w.to_bytes(), "m")),
                    Contains("true or false"));
}

TEST_CASE("a layer inside a larger checkpoint loads by prefix", "[io]") {
  const SafetensorsFile f(data("gated.checkpoint.safetensors"));
  pkm::io::SafetensorsWriter w;
  std::vector<std::vector<float>> keep;
  for (const auto& t : f.tensors()) {
    keep.push_back(f.read<float>(t.name));
    w.add("layers.3.memory." + t.name, t.shape, keep.back().data());
  }
  const std::vector<float> other_layer = {1, 2, 3, 4};
  w.add("layers.3.attention.weight", {2, 2}, other_layer.data());
  w.set_metadata("mem_knn", "4");
  const auto big = SafetensorsFile::from_bytes(w.to_bytes(), "model.safetensors");
  pkm::io::LoadOptions o;
  o.prefix = "layers.3.memory.";
  auto a = pkm::io::load_layer<float>(big, o);
  auto b = pkm::io::load_layer<float>(f);
  CHECK(a.config() == b.config());
  CHECK(a.params().gate_weight() == b.params().gate_weight());
  CHECK_THROWS_WITH(pkm::io::load_layer<float>(big), Contains("'keys' is missing"));
}

TEST_CASE("a mapped load views the file's table without a copy", "[io]") {
  auto c = pkmtest::small_config();
  pkm::MemoryLayer<float> layer(c, 4);
  pkm::io::save_layer(temp_path("map"), layer);
  SafetensorsFile f(temp_path("map"));
  auto mapped = pkm::io::load_layer_mapped<float>(f);
  CHECK_FALSE(mapped.values().owns_storage());
  CHECK(reinterpret_cast<const std::uint8_t*>(mapped.values().data()) ==
        f.bytes(f.info("values.weight")));
  CHECK(mapped.values().matrix() == layer.values().matrix());
  mapped.values().row(0)[0] += 1.0f;  // private mapping: the file is unchanged
  CHECK(SafetensorsFile(temp_path("map")).read<float>("values.weight")[0] ==
        layer.values().row(0)[0]);
  CHECK_THROWS_WITH((pkm::io::load_layer_mapped<float, pkm::bf16>(f)), Contains("use load_layer"));
  std::remove(temp_path("map").c_str());
}

TEST_CASE("every kind of malformed file is rejected with the file and tensor named",
          "[io][errors]") {
  const std::string ok = R"({"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})";
  REQUIRE_NOTHROW(SafetensorsFile::from_bytes(raw_file(ok, 16), "ok"));
  CHECK_THAT(read_error(raw_file(ok, 16)), Contains("no error"));

  CHECK_THAT(read_error({1, 2, 3}), Contains("bad.safetensors") && Contains("truncated"));
  auto truncated = raw_file(ok, 16);
  truncated.resize(truncated.size() - 1);
  CHECK_THAT(read_error(truncated), Contains("tensor 'a'") && Contains("outside the data section"));
  auto long_header = raw_file(ok, 16);
  long_header[0] = 0xff;
  long_header[1] = 0x7f;
  CHECK_THAT(read_error(long_header), Contains("runs past the end"));
  auto huge_header = raw_file(ok, 16);
  huge_header[7] = 0x01;
  CHECK_THAT(read_error(huge_header), Contains("over the limit"));
  CHECK_THAT(read_error(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,40]}})", 16)),
             Contains("tensor 'a'") && Contains("outside the data section"));
  CHECK_THAT(read_error(raw_file(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                                 R"("b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})",
                                 24)),
             Contains("tensor 'b'") && Contains("overlap") && Contains("'a'"));
  CHECK_THAT(read_error(raw_file(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8)),
             Contains("tensor 'a'") && Contains("needs 12 bytes"));
  CHECK_THAT(read_error(raw_file(R"({"a":{"dtype":"Q8","shape":[2],"data_offsets":[0,2]}})", 2)),
             Contains("tensor 'a'") && Contains("unknown dtype 'Q8'"));
  CHECK_THAT(read_error(raw_file(R"({"a":{"dtype":"F32","shape":[2, 2],)", 16)),
             Contains("not valid JSON"));
  CHECK_THAT(read_error(raw_file("[1, 2]", 0)), Contains("not a JSON object"));
  CHECK_THAT(read_error(raw_file(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8)),
             Contains("not a non-negative integer"));
  CHECK_THAT(read_error(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8)),
             Contains("data_offsets must be"));
  CHECK_THAT(
      read_error(raw_file(
          R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8)),
      Contains("needs more than 2^62 bytes"));
  CHECK_THAT(read_error(raw_file(R"({"__metadata__":{"k":3}})", 0)), Contains("not a string"));
  // The same checks on a file on disk (the mapped path): a truncated one.
  {
    const auto bytes = raw_file(ok, 15);
    std::ofstream(temp_path("trunc"), std::ios::binary)
        .write(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    CHECK_THROWS_WITH(SafetensorsFile(temp_path("trunc")),
                      Contains(temp_path("trunc")) && Contains("tensor 'a'"));
    std::ofstream(temp_path("empty"), std::ios::binary);
    CHECK_THROWS_WITH(SafetensorsFile(temp_path("empty")), Contains("truncated"));
    std::remove(temp_path("trunc").c_str());
    std::remove(temp_path("empty").c_str());
  }
  // A file on disk that does not exist.
  CHECK_THROWS_WITH(SafetensorsFile("no/such/file.safetensors"),
                    Contains("no/such/file.safetensors") && Contains("cannot open"));
  // A tensor of the wrong kind for the reader.
  const auto f = SafetensorsFile::from_bytes(raw_file(ok, 16), "ok");
  CHECK_THROWS_WITH(f.read<std::int64_t>("a"),
                    Contains("float dtype") || Contains("integer dtype"));
  CHECK_THROWS_AS(f.info("b"), std::out_of_range);
}

TEST_CASE("checkpoints with inconsistent tensors are refused", "[io][errors]") {
  const SafetensorsFile f(data("memplus.checkpoint.safetensors"));
  // Rebuild the checkpoint with one tensor changed by `edit`.
  auto rebuilt = [&](auto edit) {
    pkm::io::SafetensorsWriter w;
    static std::vector<std::vector<float>> keep;
    keep.clear();
    keep.reserve(f.tensors().size() + 1);
    for (const auto& t : f.tensors()) {
      keep.push_back(f.read<float>(t.name));
      auto shape = t.shape;
      if (edit(t.name, shape)) w.add(t.name, shape, keep.back().data());
    }
    w.set_metadata("mem_knn", "4");
    return SafetensorsFile::from_bytes(w.to_bytes(), "edited.safetensors");
  };
  auto drop = [](const char* which) {
    return [which](const std::string& n, std::vector<std::int64_t>&) { return n != which; };
  };
  CHECK_THROWS_WITH(pkm::io::infer_config(rebuilt(drop("swilu_projection.bias"))),
                    Contains("'swilu_projection.bias' is missing"));
  CHECK_THROWS_WITH(pkm::io::infer_config(rebuilt(drop("value_proj.weight"))),
                    Contains("value_proj"));
  CHECK_THROWS_WITH(pkm::io::infer_config(rebuilt(drop("keys"))), Contains("'keys' is missing"));
  CHECK_THROWS_WITH(
      pkm::io::infer_config(rebuilt([](const std::string& n, std::vector<std::int64_t>& s) {
        if (n == "values.weight") s = {s[0] / 2, s[1] * 2};  // 32 rows: not a square
        return true;
      })),
      Contains("n_keys^2"));
  CHECK_THROWS_WITH(
      pkm::io::infer_config(rebuilt([](const std::string& n, std::vector<std::int64_t>& s) {
        if (n == "swilu_projection.weight") s = {s[1], s[0]};  // transposed
        return true;
      })),
      Contains("'swilu_projection.weight' has shape [16, 12], expected [12, 16]"));
  CHECK_THROWS_WITH(
      pkm::io::infer_config(rebuilt([](const std::string& n, std::vector<std::int64_t>& s) {
        if (n == "keys") s = {s[0] * s[1] / 3, 3};  // 3 columns: k_dim 6 but 4 heads * 8
        return true;
      })),
      Contains("keys"));
}

TEST_CASE("the writer and save_layer refuse what they cannot write", "[io][errors]") {
  pkm::io::SafetensorsWriter w;
  const float v[2] = {1, 2};
  w.add("a", {2}, v);
  CHECK_THROWS_WITH(w.add("a", {2}, v), Contains("'a' added twice"));
  CHECK_THROWS_WITH(w.add("__metadata__", {2}, v), Contains("invalid tensor name"));
  CHECK_THROWS_WITH(w.add("b", {-1}, v), Contains("expected dimensions >= 0"));
  // A layer whose table is a strided view cannot be saved as one tensor.
  auto c = pkmtest::small_config();
  pkmtest::Mat wide = pkmtest::random_matrix(c.slots(), c.v_dim + 3, 1);
  pkm::MemoryLayer<double> layer(c, pkm::ValueTable<double>::view(wide.leftCols(c.v_dim)), 1);
  CHECK_THROWS_WITH(pkm::io::save_layer(temp_path("strided"), layer), Contains("contiguous"));
  CHECK_THROWS_WITH(pkm::ValueTable<double>::view(wide.data(), 4, 8, 5), Contains("stride >= dim"));
}
