// Hostile and broken input, files and sizes: unbounded recursion on a header, size arithmetic
// that wraps, empty tensors, optimizer state with impossible values, a save that fails
// half-way, a file truncated under its mapping. (The layer's and the optimizers' hostile input
// is test_hostile_layer.cpp.)
#include <catch2/catch.hpp>

#include <csignal>
#include <cstdint>
#include <cstdio>
#include <dirent.h>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <omp.h>

#include <pkm/io/checkpoint.hpp>
#include <pkm/io/optimizer_state.hpp>
#include <pkm/io/parity.hpp>
#include <pkm/pkm.hpp>

#include "files.hpp"
#include "support.hpp"

#ifndef PKM_TEST_DATA
#error "PKM_TEST_DATA must name tests/data"
#endif

using Catch::Contains;
using pkm::Index;
using pkm::io::SafetensorsFile;
using pkmtest::kInf;
using pkmtest::kNaN;
using pkmtest::Mat;
using pkmtest::same_bits;
using pkmtest::state_bytes;
using pkmtest::state_file;
using MatF = pkm::RowMatrix<float>;

namespace {

using pkmtest::raw_file;
using pkmtest::read_error;

std::vector<char> file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

/// Names in the current folder that start with `prefix` (left-over temporary files).
std::vector<std::string> files_starting_with(const std::string& prefix) {
  std::vector<std::string> out;
  if (DIR* d = ::opendir(".")) {
    while (dirent* e = ::readdir(d)) {
      const std::string n = e->d_name;
      if (n.compare(0, prefix.size(), prefix) == 0) out.push_back(n);
    }
    ::closedir(d);
  }
  return out;
}

}  // namespace

// ---- crashes and out-of-bounds access ---------------------------------------------------

TEST_CASE("a header nested 100000 levels deep is refused before any recursive code sees it",
          "[reliability][io]") {
  const std::string deep = R"({"a":{"dtype":"F32","shape":)" + std::string(100000, '[') +
                           std::string(100000, ']') + R"(,"data_offsets":[0,0]}})";
  CHECK_THAT(read_error(raw_file(deep, 0)), Contains("more than 16 levels deep"));
  // Brackets inside strings do not count.
  const std::string quoted = R"({"__metadata__":{"k":")" + std::string(1000, '[') +
                             R"("},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
  CHECK_THAT(read_error(raw_file(quoted, 4)), Contains("no error"));
  // A shape entry that is itself an array is described, not printed.
  CHECK_THAT(
      read_error(raw_file(R"({"a":{"dtype":"F32","shape":[[[[1]]]],"data_offsets":[0,4]}})", 4)),
      Contains("shape entry an array of 1 entries"));
  // Values from the file are clipped in messages: a 1 MiB name and a 1 MiB dtype.
  const std::string big(1 << 20, 'n');
  const std::string msg = read_error(raw_file(
      "{\"" + big + "\":{\"dtype\":\"" + big + "\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4));
  CHECK_THAT(msg, Contains("unknown dtype") && Contains("(1048576 characters)"));
  CHECK(msg.size() < 600);
}

TEST_CASE("sizes from outside input go through checked arithmetic", "[reliability][sizes]") {
  // A table whose element count wraps.
  CHECK_THROWS_WITH(pkm::ValueTable<float>((Index(1) << 62) + 1, 4), Contains("out of range"));
  float dummy[4] = {};
  CHECK_THROWS_AS(pkm::ValueTable<float>::view(dummy, Index(1) << 40, Index(1) << 30),
                  std::invalid_argument);
  // numel x element size wrapping past the reader's 2^62 cap: 2^62 F32 elements over 0 bytes,
  // 2^61 F64 elements over 0 bytes.
  const std::pair<const char*, const char*> wrapping[] = {{"F32", "[4611686018427387904]"},
                                                          {"F64", "[2,1152921504606846976]"},
                                                          {"F32", "[0,18446744073709551615]"}};
  for (const auto& [dtype, shape] : wrapping) {
    const std::string header = std::string(R"({"a":{"dtype":")") + dtype + R"(","shape":)" + shape +
                               R"(,"data_offsets":[0,0]}})";
    CHECK_THAT(read_error(raw_file(header, 0)),
               Contains("needs more than 2^62 bytes") || Contains("over the limit of 2^62"));
  }
  // n_keys^2 before validation.
  pkm::MemoryConfig c = pkmtest::small_config();
  c.n_keys = Index(1) << 32;
  CHECK_THROWS_WITH(c.slots(), Contains("n_keys^2"));
  CHECK_THROWS_AS(c.validate(), std::invalid_argument);
  c.heads = Index(1) << 40;
  c.knn = Index(1) << 40;
  CHECK_THROWS_AS(c.bag_size(), std::invalid_argument);
  // The writer refuses the shapes its reader refuses (and writes nothing).
  pkm::io::SafetensorsWriter w;
  const float v[1] = {1};
  CHECK_THROWS_WITH(w.add("big", {Index(1) << 31, Index(1) << 31}, v),
                    Contains("needs more than 2^62 bytes"));
  CHECK_THROWS_WITH(w.add("null", {4}, static_cast<const float*>(nullptr)), Contains("null data"));
  w.add("empty", {0, 3}, static_cast<const float*>(nullptr));
  const auto f = SafetensorsFile::from_bytes(w.to_bytes(), "empty.safetensors");
  CHECK(f.info("empty").numel() == 0);
}

TEST_CASE("zero-element tensors read without touching a null pointer, pkm_run's path included",
          "[reliability][io]") {
  const SafetensorsFile empty(std::string(PKM_TEST_DATA) + "/empty.input.safetensors");
  const std::vector<float> x = empty.read<float>("x");  // x.data() is null
  CHECK(x.empty());
  const SafetensorsFile ckpt(std::string(PKM_TEST_DATA) + "/memplus.checkpoint.safetensors");
  const auto result = pkm::io::run_parity(ckpt, empty);
  const auto out = SafetensorsFile::from_bytes(result.writer().to_bytes(), "out");
  CHECK(out.info("y").numel() == 0);
}

TEST_CASE("optimizer state with impossible values is refused and the optimizer is unchanged",
          "[reliability][optim]") {
  const Index rows = 16, dim = 4;
  pkm::ValueTable<float> table(rows, dim);
  pkm::optim::LazyAdam<float> adam(table);
  pkm::optim::RowWiseAdagrad<float> ada(table);
  // Give both some state first, so "unchanged" means something.
  pkm::SparseRowGrad<float> g;
  g.dim = dim;
  g.rows = {1, 5};
  g.values = MatF::Constant(2, dim, 0.25f);
  adam.step(table, g);
  ada.step(table, g);
  struct Case {
    const char* tensor;
    double value;
    const char* expected;
  };
  const std::vector<Case> adam_cases = {{"step", -1, "a step count >= 0"},
                                        {"row_step", -2, "row step count >= 0"},
                                        {"row_step", 2, "<= the optimizer's step count"},
                                        {"exp_avg", kNaN, "finite values"},
                                        {"exp_avg", kInf, "finite values"},
                                        {"exp_avg_sq", -1e-3, "finite values >= 0"}};
  const auto adam_before = state_bytes(adam);
  for (const auto& k : adam_cases) {
    INFO(k.tensor << " = " << k.value);
    const auto f = state_file(adam, [&](const std::string& n, auto* d, std::size_t count) {
      using T = std::remove_pointer_t<decltype(d)>;
      if (n == k.tensor) d[count - 1] = static_cast<T>(k.value);
    });
    CHECK_THROWS_WITH(pkm::io::load_optimizer_state(f, adam, ""),
                      Contains(std::string("'") + k.tensor + "'") && Contains(k.expected));
    CHECK(state_bytes(adam) == adam_before);
  }
  const auto ada_before = state_bytes(ada);
  const auto bad_sum = state_file(ada, [&](const std::string& n, auto* d, std::size_t) {
    if (n == "sum") d[3] = -1;
  });
  CHECK_THROWS_WITH(pkm::io::load_optimizer_state(bad_sum, ada, ""),
                    Contains("'sum' holds -1") && Contains("element 3"));
  CHECK(state_bytes(ada) == ada_before);

  Mat p = Mat::Ones(2, 2), dp = Mat::Ones(2, 2);
  pkm::optim::AdamW<double> dense;
  dense.add("w", p, dp);
  dense.step();
  const auto dense_before = state_bytes(dense);
  const auto bad_v = state_file(dense, [&](const std::string& n, auto* d, std::size_t) {
    if (n == "w.exp_avg_sq") d[1] = -4;
  });
  CHECK_THROWS_WITH(pkm::io::load_optimizer_state(bad_v, dense, ""), Contains("'w.exp_avg_sq'"));
  CHECK(state_bytes(dense) == dense_before);
  // And good state still loads.
  const auto good = state_file(adam, [](const std::string&, auto*, std::size_t) {});
  CHECK_NOTHROW(pkm::io::load_optimizer_state(good, adam, ""));
}

// ---- lost data --------------------------------------------------------------------------

TEST_CASE("a failed save leaves the checkpoint it would replace intact", "[reliability][io]") {
  const std::string path = "pkm_reliability_atomic.safetensors";
  const auto c = pkmtest::medium_config();
  const pkm::MemoryLayer<float> first(c, 1), second(c, 2);
  pkm::io::save_layer(path, first);
  const auto saved = file_bytes(path);
  REQUIRE(saved.size() > 100000);

  // Metadata that is not UTF-8: a pkm error naming the field, before anything is created.
  CHECK_THROWS_WITH(pkm::io::save_layer(path, second, {{"note", "caf\xe9"}}),
                    Contains("metadata value of 'note'") && Contains("UTF-8"));
  CHECK_THROWS_WITH(pkm::io::save_layer(path, second, {{"\xff", "x"}}), Contains("metadata key"));
  CHECK(file_bytes(path) == saved);

  // A write that fails half-way (the file-size limit stops it after 4 KiB).
  rlimit old{};
  REQUIRE(::getrlimit(RLIMIT_FSIZE, &old) == 0);
  const auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit small = old;
  small.rlim_cur = 4096;
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
  std::string error;
  try {
    pkm::io::save_layer(path, second);
  } catch (const std::runtime_error& e) {
    error = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &old);
  std::signal(SIGXFSZ, old_handler);
  CHECK_THAT(error, Contains(path) && Contains("unchanged"));
  CHECK(file_bytes(path) == saved);
  CHECK(files_starting_with(path + ".tmp").empty());
  const SafetensorsFile f(path);
  CHECK(same_bits(pkm::io::load_layer<float>(f).values().matrix(), first.values().matrix()));

  // A folder that does not exist.
  CHECK_THROWS_WITH(pkm::io::save_layer("no/such/folder/x.safetensors", first),
                    Contains("no/such/folder/x.safetensors"));

  // And a save that succeeds replaces the file in one step, keeping its permissions.
  REQUIRE(::chmod(path.c_str(), 0600) == 0);
  pkm::io::save_layer(path, second);
  CHECK(same_bits(pkm::io::load_layer<float>(SafetensorsFile(path)).values().matrix(),
                  second.values().matrix()));
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  std::remove(path.c_str());
}

TEST_CASE("a mapped file truncated under it gives an error on read, not SIGBUS",
          "[reliability][io]") {
  const std::string path = "pkm_reliability_truncated.safetensors";
  const pkm::MemoryLayer<float> layer(pkmtest::medium_config(), 3);
  pkm::io::save_layer(path, layer);
  const SafetensorsFile f(path);
  REQUIRE(::truncate(path.c_str(), 4096) == 0);
  CHECK_THROWS_WITH(f.read<float>("values.weight"), Contains("changed while in use"));
  CHECK_THROWS_AS(pkm::io::load_layer<float>(f), std::runtime_error);
  CHECK_THROWS_AS((pkm::io::load_layer<float, pkm::bf16>(f)),
                  std::runtime_error);  // the converting path
  std::remove(path.c_str());
}
