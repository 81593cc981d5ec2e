// Memory parallelism (pkm/distributed) against the single-process layer, run by CTest with
// mpirun -np 1, 2 and 3 (3: an uneven split). Every process builds every process's tokens
// from seeds, so it can compute the single-process reference of the whole group's step on
// its own and compare its part of the sharded result with it.
#include <mpi.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <limits>
#include <cstring>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

#include <pkm/distributed.hpp>
#include <pkm/distributed/checkpoint.hpp>
#include <pkm/pkm.hpp>

#include "helpers.hpp"

namespace {

using namespace mpitest;

template <class TableT>
void check_forward_bitwise(bool uneven, bool empty_last) {
  const pkm::MemoryConfig c = config();
  dist::Group group(MPI_COMM_WORLD);
  const dist::ColumnShards shards = split(uneven);
  const std::uint64_t seed = 7;
  dist::MemoryParallelLayer<float, TableT> layer(group, c, shards, seed);
  pkm::MemoryLayer<float, TableT> whole(c, seed);
  // The shard is those columns of the whole table, bit for bit.
  const int me = group.rank();
  CHECK(same_bits(layer.values().matrix(),
                  whole.values().matrix().middleCols(shards.begin(me), shards.width(me))));
  const Mat x = input_of(me, empty_last);
  dist::ParallelForwardCache<float> cache;
  const Mat out = layer.forward(x, cache);
  pkm::ForwardCache<float> ref_cache;
  const Mat ref = whole.forward(x, ref_cache);
  CHECK(same_bits(out, ref));
  CHECK(same_bits(cache.read, ref_cache.read));
  CHECK(cache.batch == x.rows());
}

}  // namespace

TEST_CASE("mpi: the sharded forward is bitwise the single-process layer's", "[mpi]") {
  SECTION("even split, fp32 table") { check_forward_bitwise<float>(false, false); }
  SECTION("uneven split, fp32 table, a process without tokens") {
    check_forward_bitwise<float>(true, true);
  }
  SECTION("even split, bf16 table") { check_forward_bitwise<pkm::bf16>(false, false); }
  SECTION("uneven split, fp16 table") { check_forward_bitwise<pkm::fp16>(true, false); }
}

namespace {
/// The single-process reference of one group step: each process's tokens through the whole
/// layer, value gradients merged in process order.
struct Reference {
  pkm::LayerParameters<float> dparams_mine, dparams_sum;
  Mat dx_mine;
  pkm::SparseRowGrad<float> dvalues;
};
Reference reference(const pkm::MemoryLayer<float>& whole, bool empty_last) {
  const pkm::MemoryConfig c = whole.config();
  Reference r{pkm::LayerParameters<float>(c), pkm::LayerParameters<float>(c), Mat(), {}};
  r.dparams_mine.set_zero();
  r.dparams_sum.set_zero();
  r.dvalues.dim = c.v_dim;
  for (int q = 0; q < world_size(); ++q) {
    const Mat x = input_of(q, empty_last), dout = dout_of(q, empty_last);
    pkm::ForwardCache<float> cache;
    whole.forward(x, cache);
    pkm::LayerParameters<float> dp(c);
    dp.set_zero();
    pkm::SparseRowGrad<float> dv;
    Mat dx(x.rows(), c.input_dim);
    whole.backward(x, cache, dout, dp, dv, dx);
    r.dvalues.merge(dv);
    dp.for_each([&](pkm::Tensor t, pkm::MatrixMap<float> m) { r.dparams_sum.matrix(t) += m; });
    if (q == world_rank()) {
      r.dparams_mine = dp;
      r.dx_mine = dx;
    }
  }
  return r;
}
}  // namespace

TEST_CASE("mpi: the sharded backward equals the single-process one and repeats bit for bit",
          "[mpi]") {
  const bool uneven = GENERATE(false, true);
  const bool empty_last = GENERATE(false, true);
  const pkm::MemoryConfig c = config();
  dist::Group group(MPI_COMM_WORLD);
  const dist::ColumnShards shards = split(uneven);
  dist::MemoryParallelLayer<float> layer(group, c, shards, 11);
  const pkm::MemoryLayer<float> whole(c, 11);
  const Reference ref = reference(whole, empty_last);
  const int me = group.rank();
  const Mat x = input_of(me, empty_last), dout = dout_of(me, empty_last);

  auto run = [&](pkm::LayerGradients<float>& g, Mat& dx) {
    dist::ParallelForwardCache<float> cache;
    layer.forward(x, cache);
    g = layer.make_gradients();
    g.zero();
    dx.resize(x.rows(), c.input_dim);
    layer.backward(x, cache, dout, g, dx);
  };
  pkm::LayerGradients<float> g1, g2;
  Mat dx1, dx2;
  run(g1, dx1);
  run(g2, dx2);
  // Run to run: the same bits.
  CHECK(g1.values.rows == g2.values.rows);
  CHECK(same_bits(g1.values.values, g2.values.values));
  CHECK(same_bits(dx1, dx2));
  g1.params.for_each(
      [&](pkm::Tensor t, pkm::MatrixMap<float> m) { CHECK(same_bits(m, g2.params.matrix(t))); });
  // Against the single process: the same touched rows, values within 1e-6 (norm-relative).
  REQUIRE(g1.values.rows == ref.dvalues.rows);
  CHECK(g1.values.dim == shards.width(me));
  CHECK(rel_error(g1.values.values, columns(ref.dvalues, shards.begin(me), shards.width(me))) <
        1e-6);
  if (x.rows() > 0) CHECK(rel_error(dx1, ref.dx_mine) < 1e-6);
  g1.params.for_each([&](pkm::Tensor t, pkm::MatrixMap<float> m) {
    INFO(pkm::tensor_name(t));
    CHECK(rel_error(m, ref.dparams_mine.matrix(t)) < 1e-6);
  });
  // The dense gradients summed over the group: the whole batch's.
  layer.sum_gradients(g1.params);
  g1.params.for_each([&](pkm::Tensor t, pkm::MatrixMap<float> m) {
    INFO(pkm::tensor_name(t));
    CHECK(rel_error(m, ref.dparams_sum.matrix(t)) < 1e-6);
  });
}

namespace {
/// Three steps of the sharded layer against the single-process one, both optimizers holding
/// `mask` when given (the same on every process).
template <class Opt, class Options>
void check_step(const Options& options, bool fused, const pkm::RowMask* mask = nullptr) {
  const pkm::MemoryConfig c = config();
  dist::Group group(MPI_COMM_WORLD);
  const dist::ColumnShards shards = split(true);
  dist::MemoryParallelLayer<float> layer(group, c, shards, 5);
  pkm::MemoryLayer<float> whole(c, 5);
  const int me = group.rank();
  Opt opt(layer.values(), options);
  Opt whole_opt(whole.values(), options);
  if (mask != nullptr) {
    opt.set_row_mask(*mask);
    whole_opt.set_row_mask(*mask);
  }
  for (int step = 0; step < 3; ++step) {
    const Reference ref = reference(whole, false);
    const double ref_norm = whole_opt.step(whole.values(), ref.dvalues);
    const Mat x = input_of(me, false), dout = dout_of(me, false);
    dist::ParallelForwardCache<float> cache;
    layer.forward(x, cache);
    pkm::LayerParameters<float> dp(c);
    dp.set_zero();
    double norm = 0;
    if (fused) {
      norm = layer.backward_fused(x, cache, dout, dp, opt);
    } else {
      pkm::SparseRowGrad<float> dv;
      layer.backward(x, cache, dout, dp, dv);
      norm = layer.step(opt, dv);
    }
    CHECK(std::abs(norm - ref_norm) <= 1e-6 * ref_norm);
    const Mat mine = layer.values().matrix();
    const Mat want = whole.values().matrix().middleCols(shards.begin(me), shards.width(me));
    CHECK(rel_error(mine, want) < 1e-6);
    CHECK(opt.steps() == whole_opt.steps());
  }
}
}  // namespace

TEST_CASE("mpi: a sharded optimizer step equals the single-process step", "[mpi]") {
  pkm::optim::AdamOptions adam;
  adam.lr = 1e-2;
  adam.max_grad_norm = 0.05;  // clipping on: the norm is the group's
  pkm::optim::RowWiseAdagradOptions adagrad;
  adagrad.lr = 0.1;
  adagrad.weight_decay = 0.01;
  adagrad.max_grad_norm = 0.05;
  SECTION("lazy Adam, fused") { check_step<pkm::optim::LazyAdam<float>>(adam, true); }
  SECTION("lazy Adam, backward then step") { check_step<pkm::optim::LazyAdam<float>>(adam, false); }
  SECTION("row-wise Adagrad, fused") {
    check_step<pkm::optim::RowWiseAdagrad<float>>(adagrad, true);
  }
  SECTION("row-wise Adagrad, backward then step") {
    check_step<pkm::optim::RowWiseAdagrad<float>>(adagrad, false);
  }
}

TEST_CASE("mpi: save shards, gather, load: the same layer", "[mpi]") {
  const pkm::MemoryConfig c = config();
  dist::Group group(MPI_COMM_WORLD);
  const dist::ColumnShards shards = split(true);
  dist::MemoryParallelLayer<float, pkm::bf16> layer(group, c, shards, 3);
  const pkm::MemoryLayer<float, pkm::bf16> whole(c, 3);
  const int me = group.rank(), P = group.size();
  const GroupDir dir;  // one folder for the group, removed at the end
  REQUIRE(!dir.path.empty());
  const std::string prefix = dir.path + "/layer";
  dist::save_shard(dist::shard_path(prefix, me, P), layer);
  std::vector<std::string> paths;
  for (int q = P - 1; q >= 0; --q) paths.push_back(dist::shard_path(prefix, q, P));  // any order
  const std::string gathered = dir.path + "/whole-" + std::to_string(me) + ".safetensors";
  pkm::io::gather_shards(paths, gathered);
  // The gathered file is the single-process layer, bit for bit.
  const auto loaded = pkm::io::load_layer<float, pkm::bf16>(pkm::io::SafetensorsFile(gathered));
  CHECK(loaded.config() == c);
  CHECK(same_bits(loaded.values().matrix(), whole.values().matrix()));
  loaded.params().for_each([&](pkm::Tensor t, pkm::ConstMatrixMap<float> m) {
    CHECK(same_bits(m, whole.params().matrix(t)));
  });
  // A shard file alone is refused by the single-process loader.
  CHECK_THROWS_WITH(
      pkm::io::load_layer<float>(pkm::io::SafetensorsFile(dist::shard_path(prefix, me, P))),
      Catch::Contains("gather the shards"));
  // Loading: from this process's shard file, and this process's columns of the whole file.
  const Mat x = input_of(me, false);
  dist::ParallelForwardCache<float> cache;
  const Mat out = layer.forward(x, cache);
  for (const std::string& path : {dist::shard_path(prefix, me, P), gathered}) {
    auto back = dist::load_shard<float, pkm::bf16>(group, path, shards);
    CHECK(same_bits(back.values().matrix(), layer.values().matrix()));
    dist::ParallelForwardCache<float> cache2;
    CHECK(same_bits(back.forward(x, cache2), out));
  }
  // Another process's shard file: refused on every process.
  if (P > 1) {
    CHECK_THROWS_AS((dist::load_shard<float, pkm::bf16>(
                        group, dist::shard_path(prefix, (me + 1) % P, P), shards)),
                    std::invalid_argument);
  }
}

TEST_CASE("mpi: processes that disagree fail together, with a clear message", "[mpi]") {
  const pkm::MemoryConfig c = config();
  dist::Group group(MPI_COMM_WORLD);
  const int me = group.rank(), P = group.size();
  const dist::ColumnShards shards = dist::ColumnShards::even(c.v_dim, P);
  SECTION("different seeds: different dense parameters") {
    if (P == 1) return;
    CHECK_THROWS_WITH((dist::MemoryParallelLayer<float>(group, c, shards, me == 0 ? 1 : 2)),
                      Catch::Contains("disagree on the layer"));
  }
  SECTION("different configs") {
    if (P == 1) return;
    pkm::MemoryConfig mine = c;
    if (me == P - 1) mine.knn = 3;
    CHECK_THROWS_WITH((dist::MemoryParallelLayer<float>(group, mine, shards, 1)),
                      Catch::Contains("disagree on the layer"));
  }
  SECTION("a split for another number of processes") {
    const dist::ColumnShards wrong = dist::ColumnShards::even(c.v_dim, P + 1);
    CHECK_THROWS_WITH((dist::MemoryParallelLayer<float>(group, c, wrong, 1)),
                      Catch::Contains("expected one per process"));
  }
  SECTION("a bad input on one process: every process throws the same kind of error") {
    dist::MemoryParallelLayer<float> layer(group, c, shards, 1);
    const Mat x = me == 0 ? random_matrix(3, c.input_dim + 1, 1) : input_of(me, false);
    dist::ParallelForwardCache<float> cache;
    try {
      layer.forward(x, cache);
      FAIL("forward did not throw");
    } catch (const std::invalid_argument& e) {
      const std::string what = e.what();
      CHECK(what.find("x has 25 columns, expected input_dim = 24") != std::string::npos);
      if (me != 0) CHECK(what.find("process 0 of the group failed") != std::string::npos);
    }
    CHECK(cache.batch == -1);  // not filled: backward refuses it
    // The group is still usable afterwards.
    const Mat good = input_of(me, false);
    CHECK_NOTHROW(layer.forward(good, cache));
  }
  SECTION("a NaN in one process's columns names the row") {
    dist::MemoryParallelLayer<float> layer(group, c, shards, 1);
    const Mat x = input_of(me, false);
    dist::ParallelForwardCache<float> cache;
    layer.forward(x, cache);
    const Index row = cache.indices(0, 0);  // read by this process's first token
    // Every process poisons the row process 0's first token reads, in process P-1's columns.
    Index bad = row;
    MPI_Bcast(&bad, 1, MPI_INT64_T, 0, MPI_COMM_WORLD);
    if (me == P - 1) layer.values().row(bad)[0] = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH(layer.forward(x, cache),
                      Catch::Contains("value table row " + std::to_string(bad)));
  }
  SECTION("processes in different calls") {
    if (P == 1) return;
    dist::MemoryParallelLayer<float> layer(group, c, shards, 1);
    const Mat x = input_of(me, false);
    dist::ParallelForwardCache<float> cache;
    pkm::LayerParameters<float> dp(c);
    dp.set_zero();
    if (me == 0) {
      CHECK_THROWS_WITH(layer.sum_gradients(dp), Catch::Contains("not in the same call"));
    } else {
      CHECK_THROWS_WITH(layer.forward(x, cache), Catch::Contains("not in the same call"));
    }
  }
  SECTION("backward before forward") {
    dist::MemoryParallelLayer<float> layer(group, c, shards, 1);
    const Mat x = input_of(me, false), dout = dout_of(me, false);
    dist::ParallelForwardCache<float> cache;
    auto g = layer.make_gradients();
    CHECK_THROWS_WITH(layer.backward(x, cache, dout, g), Catch::Contains("cache was not filled"));
  }
}

TEST_CASE("mpi: a group on a sub-communicator of the caller's", "[mpi]") {
  // Processes 0 and 1 form one group, the others a second one: each shards its own table.
  MPI_Comm sub = MPI_COMM_NULL;
  MPI_Comm_split(MPI_COMM_WORLD, world_rank() < 2 ? 0 : 1, world_rank(), &sub);
  {
    const pkm::MemoryConfig c = config();
    dist::Group group(sub);
    CHECK(group.size() == (world_rank() < 2 ? std::min(2, world_size()) : world_size() - 2));
    const auto shards = dist::ColumnShards::even(c.v_dim, group.size());
    dist::MemoryParallelLayer<float> layer(group, c, shards, 21);
    const pkm::MemoryLayer<float> whole(c, 21);
    const Mat x = input_of(world_rank(), false);
    dist::ParallelForwardCache<float> cache;
    pkm::ForwardCache<float> ref_cache;
    CHECK(same_bits(layer.forward(x, cache), whole.forward(x, ref_cache)));
  }
  MPI_Comm_free(&sub);
}

TEST_CASE("mpi: slot statistics summed over the group equal one process counting every batch",
          "[mpi]") {
  const pkm::MemoryConfig c = config();
  const pkm::MemoryLayer<float> layer(c, 31);
  dist::Group group(MPI_COMM_WORLD);
  auto stats_of = [&](int q) {  // process q's batches: two of its own
    pkm::SlotStatistics s(c.slots(), true);
    for (int b = 0; b < 2; ++b) {
      pkm::ForwardCache<float> cache;
      layer.forward(random_matrix(20 + 3 * q, c.input_dim, 300 + 10 * q + b), cache);
      s.add(cache);
    }
    return s;
  };
  pkm::SlotStatistics mine = stats_of(group.rank());
  dist::sum_slot_statistics(group, mine);
  pkm::SlotStatistics ref = stats_of(0);
  for (int q = 1; q < group.size(); ++q) ref.merge(stats_of(q));
  CHECK(mine.documents() == 2 * group.size());
  CHECK(mine.counts() == ref.counts());
  CHECK(mine.document_counts() == ref.document_counts());
  CHECK(mine.total_reads() == ref.total_reads());
  CHECK(mine.mass() == ref.mass());  // both add in process order
  // Statistics of another size on one process: every process throws, nothing changes.
  pkm::SlotStatistics odd(group.rank() == 0 && group.size() > 1 ? c.slots() + 1 : c.slots());
  const auto before = odd.counts();
  if (group.size() > 1)
    CHECK_THROWS_AS(dist::sum_slot_statistics(group, odd), std::invalid_argument);
  CHECK(odd.counts() == before);
}

TEST_CASE(
    "mpi: a row mask on a sharded step: the same as the single-process masked step; masks must "
    "agree",
    "[mpi]") {
  const pkm::MemoryConfig c = config();
  pkm::optim::AdamOptions adam;
  adam.lr = 1e-2;
  adam.weight_decay = 0.1;
  adam.max_grad_norm = 0.05;
  std::vector<std::int64_t> even;
  for (std::int64_t r = 0; r < c.slots(); r += 2) even.push_back(r);
  const pkm::RowMask mask(c.slots(), even);  // the same on every process
  SECTION("fused") { check_step<pkm::optim::LazyAdam<float>>(adam, true, &mask); }
  SECTION("backward then step") { check_step<pkm::optim::LazyAdam<float>>(adam, false, &mask); }
  SECTION("a mask of each process's own: every process throws, nothing changes") {
    dist::Group group(MPI_COMM_WORLD);
    if (group.size() == 1) return;
    const int me = group.rank();
    dist::MemoryParallelLayer<float> layer(group, c, split(true), 5);
    pkm::optim::LazyAdam<float> opt(layer.values(), adam);
    opt.set_row_mask(pkm::RowMask(c.slots(), {std::int64_t(me)}));
    const Mat before = layer.values().matrix();
    const Mat x = input_of(me, false), dout = dout_of(me, false);
    dist::ParallelForwardCache<float> cache;
    layer.forward(x, cache);
    pkm::LayerParameters<float> dp(c);
    dp.set_zero();
    CHECK_THROWS_WITH(layer.backward_fused(x, cache, dout, dp, opt), Catch::Contains("row mask"));
    pkm::SparseRowGrad<float> dv;
    layer.backward(x, cache, dout, dp, dv);
    CHECK_THROWS_WITH(layer.step(opt, dv), Catch::Contains("row mask"));
    CHECK(same_bits(Mat(layer.values().matrix()), before));
  }
}
