// The parts of memory parallelism that need no MPI: the column split, a shard's initial
// values, the read of a column range (bitwise the same columns of the whole read: what makes
// the sharded forward exact), and shard checkpoints (split, gather, refusals).
#include <catch2/catch.hpp>
#include <cstdio>
#include <string>
#include <vector>

#include <pkm/distributed/column_shards.hpp>
#include <pkm/io/shards.hpp>
#include <pkm/pkm.hpp>

#include "support.hpp"

using pkm::Index;
using pkm::distributed::ColumnShards;
using pkmtest::same_bits;

TEST_CASE("shards: column splits, even and uneven, and bad ones refused", "[shards]") {
  const ColumnShards even = ColumnShards::even(1000, 3);
  CHECK(even.offsets() == std::vector<Index>{0, 334, 667, 1000});
  CHECK(even.width(0) == 334);
  CHECK(even.width(2) == 333);
  CHECK(even.to_string() == "[0, 334) [334, 667) [667, 1000)");
  CHECK(ColumnShards::even(7, 7).width(6) == 1);
  CHECK(ColumnShards::from_offsets({0, 1, 37}).width(1) == 36);
  CHECK_THROWS_WITH(ColumnShards::even(2, 3), Catch::Contains("at least one column per process"));
  CHECK_THROWS_WITH(ColumnShards::even(10, 0), Catch::Contains("expected ranks >= 1"));
  CHECK_THROWS_WITH(ColumnShards::from_offsets({0, 5, 5, 9}),
                    Catch::Contains("offsets[2] = 5 after 5"));
  CHECK_THROWS_WITH(ColumnShards::from_offsets({1, 5}), Catch::Contains("starting at 0"));
  CHECK_THROWS_AS(ColumnShards::from_offsets({0}), std::invalid_argument);
}

TEST_CASE("shards: a shard's initial values are those columns of the whole table", "[shards]") {
  const Index rows = 37, dim = 301;
  pkm::ValueTable<float> whole(rows, dim);
  pkm::init_values(whole, 9);
  for (auto [c0, w] :
       {std::pair<Index, Index>{0, 1}, {1, 7}, {8, 256}, {3, 298}, {300, 1}, {0, 301}}) {
    INFO("columns " << c0 << " + " << w);
    pkm::ValueTable<float> part(rows, w);
    pkm::init_value_columns(part, 9, dim, c0);
    CHECK(same_bits(part.matrix(), whole.matrix().middleCols(c0, w)));
  }
  pkm::ValueTable<float> part(rows, 10);
  CHECK_THROWS_WITH(pkm::init_value_columns(part, 9, dim, 295),
                    Catch::Contains("not within a table of 301"));
}

namespace {
template <class T>
void check_column_reads() {
  const Index rows = 64, dim = 583, B = 9,
              bag = 6;  // 583: the AVX-512, 64-, 8-wide blocks and a tail
  pkm::ValueTable<T> whole(rows, dim);
  pkm::init_values(whole, 4);
  pkm::IndexMatrix idx(B, bag);
  pkm::RowMatrix<float> w(B, bag);
  std::mt19937 g(1);
  for (Index i = 0; i < idx.size(); ++i) {
    idx.data()[i] = static_cast<Index>(g() % rows);
    w.data()[i] = std::uniform_real_distribution<float>(-1, 1)(g);
  }
  pkm::RowMatrix<float> full(B, dim);
  pkm::embedding_bag<T>(whole, idx, w, full);
  for (auto [c0, width] :
       {std::pair<Index, Index>{0, 1}, {1, 7}, {5, 256}, {3, 300}, {260, 323}, {511, 72}}) {
    INFO("columns " << c0 << " + " << width);
    pkm::ValueTable<T> part(rows, width);
    part.matrix() = whole.matrix().middleCols(c0, width);
    pkm::RowMatrix<float> out(B, width);
    pkm::embedding_bag<T>(part, idx, w, out);
    CHECK(same_bits(out, full.middleCols(c0, width)));
  }
}
}  // namespace

TEST_CASE("shards: the read of a column range is bitwise those columns of the whole read",
          "[shards]") {
  check_column_reads<float>();
  check_column_reads<pkm::bf16>();
  check_column_reads<pkm::fp16>();
}

namespace {
std::string path(const std::string& name) { return "pkm_test_shards_" + name + ".safetensors"; }
void remove_all(const std::vector<std::string>& paths) {
  for (const auto& p : paths) std::remove(p.c_str());
}
}  // namespace

TEST_CASE("shards: split then gather gives back the checkpoint, and bad sets of shards are refused",
          "[shards][io]") {
  pkm::MemoryConfig c = pkmtest::small_config();
  c.v_dim = 11;
  c.gating = true;
  const pkm::MemoryLayer<float, pkm::bf16> layer(c, 3);
  pkm::io::save_layer(path("whole"), layer);
  const std::vector<std::string> parts = {path("p0"), path("p1"), path("p2")};
  pkm::io::split_checkpoint(path("whole"), {0, 2, 3, 11}, parts);
  {
    const pkm::io::SafetensorsFile p1(parts[1]);
    CHECK(p1.info("values.weight").shape == std::vector<std::int64_t>{c.slots(), 1});
    CHECK(p1.metadata().at("pkm_shard_column_begin") == "2");
    CHECK(pkm::io::infer_config(p1) == c);  // the whole layer's config, v_dim included
  }
  pkm::io::gather_shards({parts[2], parts[0], parts[1]}, path("gathered"));
  const auto back =
      pkm::io::load_layer<float, pkm::bf16>(pkm::io::SafetensorsFile(path("gathered")));
  CHECK(back.config() == c);
  CHECK(same_bits(back.values().matrix(), layer.values().matrix()));
  back.params().for_each([&](pkm::Tensor t, pkm::ConstMatrixMap<float> m) {
    CHECK(same_bits(m, layer.params().matrix(t)));
  });

  CHECK_THROWS_WITH(pkm::io::gather_shards({parts[0], parts[2]}, path("bad")),
                    Catch::Contains("end at column 2"));
  CHECK_THROWS_WITH(pkm::io::gather_shards({parts[0], parts[1]}, path("bad")),
                    Catch::Contains("a shard is missing"));
  CHECK_THROWS_WITH(pkm::io::gather_shards({parts[0], parts[0], parts[1], parts[2]}, path("bad")),
                    Catch::Contains("without gaps or overlaps"));
  CHECK_THROWS_WITH(pkm::io::gather_shards({path("whole")}, path("bad")),
                    Catch::Contains("is not a column shard"));
  CHECK_THROWS_WITH(pkm::io::load_layer<float>(pkm::io::SafetensorsFile(parts[0])),
                    Catch::Contains("gather the shards"));
  // Shards of another layer (other dense parameters) do not mix.
  const pkm::MemoryLayer<float, pkm::bf16> other(c, 4);
  pkm::io::save_layer(path("other"), other);
  const std::vector<std::string> others = {path("o0"), path("o1")};
  pkm::io::split_checkpoint(path("other"), {0, 2, 11}, others);
  CHECK_THROWS_WITH(pkm::io::gather_shards({parts[0], others[1]}, path("bad")),
                    Catch::Contains("must come from one layer"));
  CHECK_THROWS_WITH(pkm::io::split_checkpoint(path("whole"), {0, 5, 12}, others),
                    Catch::Contains("offsets from 0 to v_dim = 11"));
  CHECK_THROWS_WITH(pkm::io::split_checkpoint(path("whole"), {0, 5, 5, 11}, parts),
                    Catch::Contains("strictly increasing"));
  CHECK_THROWS_WITH(pkm::io::split_checkpoint(parts[0], {0, 11}, {path("bad")}),
                    Catch::Contains("gather the shards"));
  // A file marked with only part of the shard metadata is refused.
  {
    pkm::io::SafetensorsWriter w;
    pkm::io::add_layer(w, layer);
    w.set_metadata("pkm_shard_column_begin", "0");
    w.write(path("partial"));
    CHECK_THROWS_WITH(pkm::io::infer_config(pkm::io::SafetensorsFile(path("partial"))),
                      Catch::Contains("a column shard needs all three"));
  }
  {
    pkm::io::SafetensorsWriter w;
    pkm::io::add_layer(w, layer);
    w.set_metadata("pkm_shard_column_begin", "4");
    w.set_metadata("pkm_shard_column_end", "2");
    w.set_metadata("pkm_shard_v_dim", "11");
    w.write(path("inverted"));
    CHECK_THROWS_WITH(pkm::io::infer_config(pkm::io::SafetensorsFile(path("inverted"))),
                      Catch::Contains("expected 0 <= begin < end <= v_dim"));
  }
  CHECK(std::fopen(path("bad").c_str(), "r") == nullptr);  // nothing written by a refused gather
  remove_all({path("whole"), path("gathered"), path("other"), path("partial"), path("inverted")});
  remove_all(parts);
  remove_all(others);
}
