// Quantized tables in safetensors files (pkm/io/checkpoint.hpp, pkm/io/quantize.hpp): save and
// load (copied and mapped) give back the same rows and the same outputs, the file-to-file
// quantizer writes exactly what pkm::quantize makes, hostile files get clear errors, and the
// golden cases' output error per format.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include <pkm/io/checkpoint.hpp>
#include <pkm/io/quantize.hpp>
#include <pkm/memory_layer.hpp>

#include "files.hpp"
#include "support.hpp"

#ifndef PKM_TEST_DATA
#error "PKM_TEST_DATA must name tests/data"
#endif

using Catch::Contains;
using pkm::Dtype;
using pkm::Index;
using pkm::io::SafetensorsFile;
using pkmtest::same_bits;
using MatF = pkm::RowMatrix<float>;
using QuantizedLayer = pkm::MemoryLayer<float, pkm::Quantized>;

namespace {

std::string qdata(const std::string& file) { return std::string(PKM_TEST_DATA) + "/" + file; }
std::string qpath(const std::string& name) { return "pkm_test_quant_" + name + ".safetensors"; }

std::vector<std::uint8_t> file_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<std::uint8_t>(std::istreambuf_iterator<char>(f), {});
}
bool exists(const std::string& path) { return std::ifstream(path).good(); }

/// The bytes of a file written by `w`, with `edit` applied to the writer first.
SafetensorsFile quantized_file(const QuantizedLayer& layer,
                               const std::map<std::string, std::string>& meta_override,
                               std::vector<std::uint8_t>* bytes_out = nullptr) {
  pkm::io::SafetensorsWriter w;
  pkm::io::add_layer(w, layer);
  for (const auto& [k, v] : meta_override) w.set_metadata(k, v);
  std::vector<std::uint8_t> bytes = w.to_bytes();
  if (bytes_out) *bytes_out = bytes;
  return SafetensorsFile::from_bytes(std::move(bytes), "quantized");
}

MatF read_matrix(const SafetensorsFile& f, const std::string& name) {
  const auto& t = f.info(name);
  MatF m(t.shape[0], t.shape[1]);
  f.read(name, m.data(), std::size_t(m.size()));
  return m;
}

}  // namespace

TEST_CASE("quantized layers save and load: copied and mapped, the same rows and outputs",
          "[quantized][io]") {
  const pkm::MemoryConfig c = pkmtest::medium_config();
  pkm::MemoryLayer<float> full(c, 5);
  const MatF x = pkmtest::random_matrix(30, c.input_dim, 8).cast<float>();
  for (Dtype f : pkm::kQuantizedDtypes) {
    INFO(pkm::dtype_name(f));
    const QuantizedLayer layer(full.params(), pkm::quantize(full.values(), f));
    pkm::io::save_layer(qpath("rt"), layer);
    const SafetensorsFile file(qpath("rt"));
    CHECK(file.info("values.weight").dtype == Dtype::u8);
    CHECK(file.info("values.weight").shape ==
          std::vector<std::int64_t>{c.slots(), pkm::quantized_row_bytes(f, c.v_dim)});
    CHECK(file.metadata().at("pkm_values_format") == pkm::dtype_name(f));
    const QuantizedLayer copied = pkm::io::load_layer<float, pkm::Quantized>(file);
    SafetensorsFile mapped_file(qpath("rt"));
    const QuantizedLayer mapped = pkm::io::load_layer_mapped<float, pkm::Quantized>(mapped_file);
    CHECK(copied.values().format() == f);
    CHECK(!mapped.values().owns_storage());
    CHECK(std::memcmp(copied.values().data(), layer.values().data(),
                      std::size_t(layer.values().bytes())) == 0);
    CHECK(std::memcmp(mapped.values().data(), layer.values().data(),
                      std::size_t(layer.values().bytes())) == 0);
    pkm::ForwardCache<float> c0, c1, c2;
    const MatF y = layer.forward(x, c0);
    CHECK(same_bits(copied.forward(x, c1), y));
    CHECK(same_bits(mapped.forward(x, c2), y));
    // A float table type refuses the file, and a quantized one refuses a float file.
    CHECK_THROWS_WITH(pkm::io::load_layer<float>(file), Contains("pkm::Quantized"));
    pkm::io::save_layer(qpath("float"), full);
    const SafetensorsFile float_file(qpath("float"));
    CHECK_THROWS_WITH((pkm::io::load_layer<float, pkm::Quantized>(float_file)),
                      Contains("not quantized") && Contains("pkm_quantize"));
  }
  std::remove(qpath("rt").c_str());
  std::remove(qpath("float").c_str());
}

TEST_CASE("quantize_checkpoint writes what pkm::quantize makes, from F32 and BF16 tables",
          "[quantized][io]") {
  const pkm::MemoryConfig c = pkmtest::medium_config();
  pkm::MemoryLayer<float> full(c, 6);
  pkm::io::save_layer(qpath("in32"), full, {{"note", "kept"}});
  pkm::MemoryLayer<float, pkm::bf16> half(full.params(), [&] {
    pkm::ValueTable<pkm::bf16> t(c.slots(), c.v_dim);
    for (Index r = 0; r < c.slots(); ++r)
      for (Index d = 0; d < c.v_dim; ++d) t.row(r)[d] = pkm::bf16(full.values().row(r)[d]);
    return t;
  }());
  pkm::io::save_layer(qpath("in16"), half);
  for (Dtype f : pkm::kQuantizedDtypes) {
    INFO(pkm::dtype_name(f));
    const auto before = file_bytes(qpath("in32"));
    const pkm::io::QuantizeReport r = pkm::io::quantize_checkpoint(qpath("in32"), qpath("out"), f);
    CHECK(file_bytes(qpath("in32")) == before);
    CHECK(r.rows == c.slots());
    CHECK(r.table_bytes_after == std::uint64_t(c.slots() * pkm::quantized_row_bytes(f, c.v_dim)));
    const SafetensorsFile out(qpath("out"));
    CHECK(out.metadata().at("note") == "kept");
    const QuantizedLayer q = pkm::io::load_layer<float, pkm::Quantized>(out);
    const pkm::QuantizedTable want = pkm::quantize(full.values(), f);
    CHECK(std::memcmp(q.values().data(), want.data(), std::size_t(want.bytes())) == 0);
    for (int t = 0; t < pkm::kNumTensors; ++t) {
      if (!pkm::tensor_shape(c, pkm::Tensor(t)).present) continue;
      CHECK(same_bits(q.params().matrix(pkm::Tensor(t)), full.params().matrix(pkm::Tensor(t))));
    }
    pkm::io::quantize_checkpoint(qpath("in16"), qpath("out16"), f);
    const QuantizedLayer q16 =
        pkm::io::load_layer<float, pkm::Quantized>(SafetensorsFile(qpath("out16")));
    const pkm::QuantizedTable want16 = pkm::quantize(half.values(), f);
    CHECK(std::memcmp(q16.values().data(), want16.data(), std::size_t(want16.bytes())) == 0);
  }
  // A table with a NaN row: refused naming the row, no output, the input unchanged.
  full.values().row(77)[3] = pkmtest::kNaN;
  pkm::io::save_layer(qpath("nan"), full);
  std::remove(qpath("out").c_str());
  const auto nan_before = file_bytes(qpath("nan"));
  CHECK_THROWS_WITH(pkm::io::quantize_checkpoint(qpath("nan"), qpath("out"), Dtype::int8_rowwise),
                    Contains("row 77") && Contains("no output"));
  CHECK(!exists(qpath("out")));
  CHECK(file_bytes(qpath("nan")) == nan_before);
  // The output may not be the input; a quantized input, a missing table and a bad format are
  // refused.
  CHECK_THROWS_WITH(pkm::io::quantize_checkpoint(qpath("in32"), qpath("in32"), Dtype::fp8_rowwise),
                    Contains("same file"));
  pkm::io::quantize_checkpoint(qpath("in32"), qpath("out"), Dtype::int8_rowwise);
  CHECK_THROWS_WITH(pkm::io::quantize_checkpoint(qpath("out"), qpath("out2"), Dtype::int4_rowwise),
                    Contains("already quantized"));
  CHECK_THROWS_WITH(
      pkm::io::quantize_checkpoint(qpath("in32"), qpath("out2"), Dtype::int8_rowwise, "layers.1."),
      Contains("no tensor 'layers.1.values.weight'"));
  CHECK_THROWS_AS(pkm::io::quantize_checkpoint(qpath("in32"), qpath("out2"), Dtype::f16),
                  std::invalid_argument);
  CHECK(!exists(qpath("out2")));
  for (const char* n : {"in32", "in16", "out", "out16", "nan"}) std::remove(qpath(n).c_str());
}

TEST_CASE("hostile quantized files get clear errors", "[quantized][io]") {
  const pkm::MemoryConfig c = pkmtest::medium_config();
  pkm::MemoryLayer<float> full(c, 7);
  const QuantizedLayer layer(full.params(), pkm::quantize(full.values(), Dtype::int4_rowwise));
  auto load = [](const SafetensorsFile& f) { return pkm::io::load_layer<float, pkm::Quantized>(f); };
  CHECK_NOTHROW(load(quantized_file(layer, {})));
  CHECK_THROWS_WITH(load(quantized_file(layer, {{"pkm_values_format", "INT2_ROWWISE"}})),
                    Contains("INT2_ROWWISE") && Contains("expected INT8_ROWWISE"));
  // The dim metadata: the wrong width for the row bytes, not a number, absurd.
  CHECK_THROWS_WITH(load(quantized_file(layer, {{"pkm_values_dim", "41"}})),
                    Contains("rows of 24 bytes") && Contains("41 values has 25"));
  CHECK_THROWS_WITH(load(quantized_file(layer, {{"pkm_values_dim", "forty"}})),
                    Contains("not an integer"));
  CHECK_THROWS_WITH(load(quantized_file(layer, {{"pkm_values_dim", "-5"}})),
                    Contains("expected 1 to 2^40"));
  // An int4 row of 39 values has the same 24 bytes: the metadata decides, and the layer's
  // config must then match it.
  CHECK_THROWS_AS(load(quantized_file(layer, {{"pkm_values_dim", "39"}})), std::invalid_argument);
  // U8 rows without the format key.
  {
    pkm::io::SafetensorsWriter w;
    pkm::io::add_layer(w, layer);
    std::vector<std::uint8_t> bytes = w.to_bytes();
    const std::string h(bytes.begin() + 8, bytes.begin() + 8 + std::ptrdiff_t(bytes[0] | (bytes[1] << 8)));
    const auto at = h.find("pkm_values_format");
    REQUIRE(at != std::string::npos);
    std::memcpy(bytes.data() + 8 + at, "pkm_values_formaT", 17);
    CHECK_THROWS_WITH(load(SafetensorsFile::from_bytes(bytes, "nokey")),
                      Contains("U8 but __metadata__ has no 'pkm_values_format'"));
  }
  // A NaN scale: a copying load names the row; a mapped one does not scan, and the forward
  // names the row when a token reads it.
  std::vector<std::uint8_t> bytes;
  quantized_file(layer, {}, &bytes);
  const SafetensorsFile good = SafetensorsFile::from_bytes(bytes, "good");
  const auto& vt = good.info("values.weight");
  const std::size_t data0 = bytes.size() - std::size_t(good.tensors().back().end);
  (void)data0;
  const std::uint64_t header = 8 + (std::uint64_t(bytes[0]) | (std::uint64_t(bytes[1]) << 8) |
                                    (std::uint64_t(bytes[2]) << 16));
  const Index rb = pkm::quantized_row_bytes(Dtype::int4_rowwise, c.v_dim);
  const Index bad_row = 600;
  const std::uint16_t nan16 = 0x7E00;
  std::memcpy(bytes.data() + header + vt.begin + std::uint64_t(bad_row * rb + (c.v_dim + 1) / 2), &nan16, 2);
  CHECK_THROWS_WITH(load(SafetensorsFile::from_bytes(bytes, "nan scale")),
                    Contains("row 600") && Contains("not a valid INT4_ROWWISE row"));
  SafetensorsFile nan_file = SafetensorsFile::from_bytes(bytes, "nan scale");
  const QuantizedLayer mapped = pkm::io::load_layer_mapped<float, pkm::Quantized>(nan_file);
  CHECK(pkm::first_invalid_row(mapped.values()) == bad_row);
  // Truncated: the file's data is shorter than its header says.
  std::vector<std::uint8_t> cut(bytes.begin(), bytes.end() - 100);
  CHECK_THROWS_AS(SafetensorsFile::from_bytes(cut, "truncated"), std::runtime_error);
  // Row bytes that fit no format width: shape (rows, 23) for 40 int4 values.
  {
    pkm::io::SafetensorsWriter w;
    pkm::io::detail::add_dense(w, layer.params(), "");
    std::vector<std::uint8_t> rows(std::size_t(c.slots() * 23));
    w.add("values.weight", {c.slots(), 23}, rows.data());
    w.set_metadata("mem_knn", std::to_string(c.knn));
    w.set_metadata("pkm_values_format", "INT4_ROWWISE");
    w.set_metadata("pkm_values_dim", "40");
    CHECK_THROWS_WITH(load(SafetensorsFile::from_bytes(w.to_bytes(), "narrow")),
                      Contains("rows of 23 bytes"));
  }
  // A float-typed table claiming a quantized format.
  {
    pkm::io::SafetensorsWriter w;
    pkm::io::add_layer(w, full);
    w.set_metadata("pkm_values_format", "INT8_ROWWISE");
    w.set_metadata("pkm_values_dim", "40");
    CHECK_THROWS_WITH(load(SafetensorsFile::from_bytes(w.to_bytes(), "f32 claims int8")),
                      Contains("has dtype F32") && Contains("stored as U8"));
  }
  // The writer refuses a quantized format as an element dtype.
  pkm::io::SafetensorsWriter w;
  std::uint8_t one = 0;
  CHECK_THROWS_WITH(w.add("t", Dtype::int8_rowwise, {1}, &one), Contains("not an element dtype"));
}

TEST_CASE("quantized tables on the golden cases: the output's relative error per format",
          "[quantized][io][golden]") {
  // The bound per format (int8, int4, fp8) on max |y_q - y| / max |y| over the golden cases,
  // whose tables are PyTorch's random initialisation; the errors are reported in
  // docs/quantization.md.
  const double bound[] = {0.01, 0.2, 0.06};
  for (const char* name : {"memplus", "gated", "qknorm_scale", "knn_all", "bf16_values"}) {
    const std::string n = name;
    const SafetensorsFile ckpt(qdata(n + ".checkpoint.safetensors")),
        in(qdata(n + ".input.safetensors")), expected(qdata(n + ".expected.safetensors"));
    const auto full = pkm::io::load_layer<float, float>(ckpt);
    const MatF x = read_matrix(in, "x");
    const MatF y = read_matrix(expected, "y");
    int i = 0;
    for (Dtype f : pkm::kQuantizedDtypes) {
      const QuantizedLayer q(full.params(), pkm::quantize(full.values(), f));
      pkm::ForwardCache<float> cache;
      const MatF yq = q.forward(x, cache);
      const double rel = (yq - y).cwiseAbs().maxCoeff() / y.cwiseAbs().maxCoeff();
      WARN(n << " " << pkm::dtype_name(f) << ": max relative error of y " << rel);
      CHECK(rel < bound[i++]);
    }
  }
}
