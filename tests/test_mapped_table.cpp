// A value table mapped from its checkpoint: the RowFetch hook (pkm/row_fetch.hpp), the three
// ways rows come from the disk (pkm/io/mapped_table.hpp), and a file changed under the mapping.
#include <catch2/catch.hpp>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <pkm/io/checkpoint.hpp>
#include <pkm/pkm.hpp>

#include "support.hpp"

using Catch::Contains;
using pkm::io::SafetensorsFile;
using pkm::io::TableFetch;

namespace {
std::string mapped_path(const std::string& name) {
  return "pkm_test_mapped_" + name + ".safetensors";
}

/// A float layer made from `seed`, saved as pkm_test_mapped_<name>.safetensors; the file is
/// removed when the test ends, pass or fail.
struct SavedLayer {
  pkm::MemoryConfig c;
  pkm::MemoryLayer<float> layer;
  std::string path;
  SavedLayer(const std::string& name, std::uint64_t seed,
             pkm::MemoryConfig config = pkmtest::medium_config())
      : c(config), layer(config, seed), path(mapped_path(name)) {
    pkm::io::save_layer(path, layer);
  }
  SavedLayer(const SavedLayer&) = delete;
  SavedLayer& operator=(const SavedLayer&) = delete;
  ~SavedLayer() { std::remove(path.c_str()); }
};

/// Sets the file's modification time to 2020, so that a write now changes it whatever the
/// clock's granularity.
void age_file(const std::string& path) {
  const struct timespec old[2] = {{1577836800, 0}, {1577836800, 0}};
  REQUIRE(::utimensat(AT_FDCWD, path.c_str(), old, 0) == 0);
}

/// Drops the file's pages from the page cache, as a cold start.
void drop_cached(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

pkm::RowMatrix<float> inputs(const pkm::MemoryConfig& c, pkm::Index batch, unsigned seed) {
  return pkmtest::random_matrix(batch, c.input_dim, seed).cast<float>();
}
}  // namespace

TEST_CASE("a layer's RowFetch hook gets the rows the read will touch, before the read",
          "[mapped]") {
  const auto c = pkmtest::medium_config();
  pkm::MemoryLayer<float> layer(c, 3);
  const auto x = inputs(c, 5, 11);
  pkm::ForwardCache<float> plain;
  const pkm::RowMatrix<float> want = layer.forward(x, plain);

  std::vector<pkm::Index> seen;
  layer.set_row_fetch([&](const pkm::Index* rows, pkm::Index n) { seen.assign(rows, rows + n); });
  pkm::ForwardCache<float> cache;
  const pkm::RowMatrix<float> got = layer.forward(x, cache);
  CHECK(pkmtest::same_bits(got, want));
  REQUIRE(seen.size() == std::size_t(5 * c.heads * c.knn));
  CHECK(std::equal(seen.begin(), seen.end(), cache.indices.data()));

  SECTION("an empty batch reads nothing and calls nothing") {
    seen.clear();
    const pkm::RowMatrix<float> none = layer.forward(inputs(c, 0, 1), cache);
    CHECK(none.rows() == 0);
    CHECK(seen.empty());
  }
  SECTION("a hook that throws refuses the read: nothing written, the cache unfilled") {
    layer.set_row_fetch([](const pkm::Index*, pkm::Index) {
      throw std::runtime_error("storage offline");
    });
    pkm::RowMatrix<float> out = pkm::RowMatrix<float>::Constant(5, c.output_dim, 7.0f);
    CHECK_THROWS_WITH(layer.forward(x, out, cache), Contains("storage offline"));
    CHECK((out.array() == 7.0f).all());
    pkm::LayerGradients<float> g(c);
    CHECK_THROWS_WITH(layer.backward(x, cache, out, g), Contains("cache was not filled"));
    layer.set_row_fetch({});  // cleared: the plain read again
    CHECK(pkmtest::same_bits(layer.forward(x, cache), want));
  }
}

TEST_CASE("a mapped table gives the loaded table's bits with every way of fetching, cold or warm",
          "[mapped][io]") {
  const SavedLayer saved("fetch", 5);
  const auto& c = saved.c;
  const pkm::MemoryLayer<float>& full = saved.layer;
  const std::string& path = saved.path;
  const auto x = inputs(c, 9, 2);
  pkm::ForwardCache<float> cache;
  const pkm::RowMatrix<float> want = full.forward(x, cache);
  const pkm::QuantizedTable int8 = pkm::quantize(full.values(), pkm::Dtype::int8_rowwise);
  const pkm::MemoryLayer<float, pkm::Quantized> qfull(full.params(), pkm::QuantizedTable(int8));
  const std::string qpath = mapped_path("fetch_int8");
  pkm::io::save_layer(qpath, qfull);
  const pkm::RowMatrix<float> qwant = qfull.forward(x, cache);

  for (TableFetch how : {TableFetch::page_faults, TableFetch::random, TableFetch::early}) {
    INFO(pkm::io::table_fetch_name(how));
    pkm::io::LoadOptions opt;
    opt.fetch = how;
    for (int round = 0; round < 2; ++round) {  // cold, then warm
      if (round == 0) drop_cached(path), drop_cached(qpath);
      SafetensorsFile f(path);
      const auto layer = pkm::io::load_layer_mapped<float>(f, opt);
      REQUIRE(layer.row_fetch());
      CHECK(pkmtest::same_bits(layer.forward(x, cache), want));
      SafetensorsFile qf(qpath);
      const auto qlayer = pkm::io::load_layer_mapped<float, pkm::Quantized>(qf, opt);
      CHECK(pkmtest::same_bits(qlayer.forward(x, cache), qwant));
    }
  }
  std::remove(qpath.c_str());
}

TEST_CASE("a mapped layer keeps its file's mapping alive by itself", "[mapped][io]") {
  const SavedLayer saved("alive", 6);
  const auto& c = saved.c;
  const pkm::MemoryLayer<float>& full = saved.layer;
  const std::string& path = saved.path;
  const auto x = inputs(c, 3, 4);
  pkm::ForwardCache<float> cache;
  auto layer = [&] {
    SafetensorsFile f(path);
    return pkm::io::load_layer_mapped<float>(f);
  }();  // the SafetensorsFile is gone; the layer's hook holds the mapping
  CHECK(pkmtest::same_bits(layer.forward(x, cache), full.forward(x, cache)));
  std::remove(path.c_str());  // unlinked: the open file stays readable
  CHECK(pkmtest::same_bits(layer.forward(x, cache), full.forward(x, cache)));
}

TEST_CASE("a mapped file truncated or rewritten gives a clear error, never SIGBUS, and one "
          "replaced by a rename keeps serving the old table",
          "[mapped][io][errors]") {
  const SavedLayer saved("changed", 7);
  const auto& c = saved.c;
  const std::string& path = saved.path;
  const auto x = inputs(c, 4, 9);
  pkm::ForwardCache<float> cache;
  const pkm::RowMatrix<float> want = saved.layer.forward(x, cache);
  age_file(path);
  SafetensorsFile f(path);
  const auto before = static_cast<std::size_t>(std::ifstream(path, std::ios::ate).tellg());
  for (TableFetch how : {TableFetch::page_faults, TableFetch::early}) {
    pkm::io::LoadOptions opt;
    opt.fetch = how;
    const auto layer = pkm::io::load_layer_mapped<float>(f, opt);
    CHECK(pkmtest::same_bits(layer.forward(x, cache), want));
  }
  pkm::io::LoadOptions opt;
  opt.fetch = TableFetch::early;
  const auto layer = pkm::io::load_layer_mapped<float>(f, opt);

  SECTION("replaced by a rename (how pkm's writer saves): the old table, intact") {
    const pkm::MemoryLayer<float> other(c, 8);
    pkm::io::save_layer(path, other);
    CHECK(pkmtest::same_bits(layer.forward(x, cache), want));
  }
  SECTION("truncated to half: runtime_error naming the file, the output untouched") {
    REQUIRE(::truncate(path.c_str(), off_t(before / 2)) == 0);
    pkm::RowMatrix<float> out = pkm::RowMatrix<float>::Constant(4, c.output_dim, 3.0f);
    CHECK_THROWS_AS(layer.forward(x, out, cache), std::runtime_error);
    CHECK_THROWS_WITH(layer.forward(x, out, cache),
                      Contains(path) && Contains("truncated or rewritten while mapped"));
    CHECK((out.array() == 3.0f).all());
  }
  SECTION("rewritten in place at the same size: runtime_error") {
    {
      std::fstream io(path, std::ios::in | std::ios::out | std::ios::binary);
      io.seekp(std::streamoff(before - 16));
      io.write("0123456789abcdef", 16);
    }
    CHECK_THROWS_WITH(layer.forward(x, cache), Contains("rewritten while mapped"));
  }
}

TEST_CASE("MappedTableFetch refuses rows that do not fit the tensor", "[mapped][errors]") {
  const SavedLayer saved("fit", 1, pkmtest::small_config());
  const auto& c = saved.c;
  SafetensorsFile f(saved.path);
  const pkm::io::TensorInfo& v = f.info("values.weight");
  CHECK_NOTHROW(pkm::io::MappedTableFetch(f, v, c.slots(), 4 * c.v_dim, TableFetch::early));
  CHECK_THROWS_WITH(pkm::io::MappedTableFetch(f, v, c.slots() + 1, 4 * c.v_dim, TableFetch::early),
                    Contains("do not fit tensor 'values.weight'"));
  CHECK_THROWS_AS(pkm::io::MappedTableFetch(f, v, -1, 4, TableFetch::early), std::invalid_argument);
}
