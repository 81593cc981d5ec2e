// Faults of memory parallelism that used to hang, lose data or go unnoticed, on 2 and 3
// processes (CTest mpi_faults_np2 / np3, with a short timeout: a hang fails the test instead
// of blocking CI). Tagged [faults]; the plain MPI runs leave them out.
#include <mpi.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include <pkm/distributed.hpp>
#include <pkm/distributed/checkpoint.hpp>
#include <pkm/pkm.hpp>

#include "helpers.hpp"

namespace {

using namespace mpitest;

/// A layer after one forward, ready for a backward or a step.
struct Stepped {
  dist::Group& group;
  dist::MemoryParallelLayer<float> layer;
  Mat x, dout;
  dist::ParallelForwardCache<float> cache;
  pkm::LayerParameters<float> dp;
  explicit Stepped(dist::Group& g)
      : group(g),
        layer(g, config(), split(true), 9),
        x(input_of(g.rank(), false)),
        dout(dout_of(g.rank(), false)),
        dp(config()) {
    dp.set_zero();
    layer.forward(x, cache);
  }
};

/// f() must throw std::invalid_argument with `what` in its message.
template <class F>
void check_invalid(F&& f, const std::string& what) {
  try {
    f();
    FAIL("no error; expected one naming " << what);
  } catch (const std::invalid_argument& e) {
    CHECK_THAT(e.what(), Catch::Contains(what));
  }
}

/// Runs a backward_fused and a backward + step with `opt` on a fresh layer: both must throw
/// std::invalid_argument containing `what` on every process, the table and the optimizer's
/// step count unchanged.
template <class Opt>
void check_refused(dist::Group& group, Opt& opt, const std::string& what) {
  Stepped s(group);
  const Mat before = s.layer.values().matrix();
  const auto steps = opt.steps();
  check_invalid([&] { s.layer.backward_fused(s.x, s.cache, s.dout, s.dp, opt); }, what);
  pkm::SparseRowGrad<float> dv;
  s.layer.backward(s.x, s.cache, s.dout, s.dp, dv);
  check_invalid([&] { s.layer.step(opt, dv); }, what);
  CHECK(same_bits(Mat(s.layer.values().matrix()), before));
  CHECK(opt.steps() == steps);
}

}  // namespace

TEST_CASE("mpi faults: processes in different calls that open with the same phase are told so",
          "[mpi][faults]") {
  dist::Group group(MPI_COMM_WORLD);
  const int me = group.rank();
  if (group.size() == 1) return;
  const pkm::MemoryConfig c = config();
  dist::MemoryParallelLayer<float> layer(group, c, dist::ColumnShards::even(c.v_dim, group.size()),
                                         1);
  pkm::LayerParameters<float> dp(c);
  dp.set_zero();
  pkm::SlotStatistics stats(c.slots());
  // Both calls open with a `sum` agreement: before calls were told apart by name, this hung.
  try {
    if (me == 0)
      layer.sum_gradients(dp);
    else
      dist::sum_slot_statistics(group, stats);
    FAIL("no error");
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    CHECK_THAT(what, Catch::Contains("not in the same call"));
    CHECK_THAT(
        what, Catch::Contains("process 0 in pkm::distributed::MemoryParallelLayer::sum_gradients"));
    CHECK_THAT(what, Catch::Contains("in pkm::distributed::sum_slot_statistics"));
  }
  // The group is still usable, and in step: the same call on every process works.
  CHECK_NOTHROW(layer.sum_gradients(dp));
  // A forward on one process against a save on the others.
  GroupDir dir;
  dist::ParallelForwardCache<float> cache;
  const Mat x = input_of(me, false);
  if (me == group.size() - 1) {
    CHECK_THROWS_WITH(layer.forward(x, cache), Catch::Contains("not in the same call"));
  } else {
    CHECK_THROWS_WITH(dist::save_shard(dist::shard_path(dir.path + "/l", me, group.size()), layer),
                      Catch::Contains("not in the same call"));
  }
}

TEST_CASE("mpi faults: value optimizers that differ between processes are refused, nothing changes",
          "[mpi][faults]") {
  dist::Group group(MPI_COMM_WORLD);
  const int me = group.rank();
  if (group.size() == 1) return;
  const pkm::MemoryConfig c = config();
  const Index width = split(true).width(me);
  SECTION(
      "row-wise Adagrad, a different clip norm on one process (was MPI_ERR_TRUNCATE and a hang)") {
    pkm::optim::RowWiseAdagradOptions o;
    o.max_grad_norm = me == 0 ? 0.05 : 0.0;
    pkm::optim::RowWiseAdagrad<float> opt(c.slots(), width, o);
    check_refused(group, opt, "the value optimizer's options");
  }
  SECTION(
      "lazy Adam, a different learning rate on one process (each moved its columns by its own "
      "lr)") {
    pkm::optim::AdamOptions o;
    o.lr = me == group.size() - 1 ? 2e-2 : 1e-2;
    pkm::optim::LazyAdam<float> opt(c.slots(), width, o);
    check_refused(group, opt, "the value optimizer's options");
  }
  SECTION("lazy Adam after one local step on one process") {
    pkm::optim::LazyAdam<float> opt(c.slots(), width);
    if (me == 0) {
      pkm::ValueTable<float> scratch(c.slots(), width);
      pkm::SparseRowGrad<float> g;
      g.dim = width;
      g.rows = {3};
      g.values = Mat::Constant(1, width, 0.5f);
      opt.step(scratch, g);  // a step of its own, outside the group
    }
    check_refused(group, opt, "the value optimizer's step count");
  }
  SECTION("different kinds: SGD on one process, Adagrad on the others") {
    Stepped s(group);
    const Mat before = s.layer.values().matrix();
    pkm::optim::SgdOptions so;
    pkm::optim::RowWiseAdagradOptions ao;
    pkm::SparseRowGrad<float> dv;
    s.layer.backward(s.x, s.cache, s.dout, s.dp, dv);
    if (me == 0) {
      pkm::optim::SparseSgd<float> opt(c.slots(), width, so);
      CHECK_THROWS_WITH(s.layer.step(opt, dv), Catch::Contains("the value optimizer's kind"));
    } else {
      pkm::optim::RowWiseAdagrad<float> opt(c.slots(), width, ao);
      CHECK_THROWS_WITH(s.layer.step(opt, dv), Catch::Contains("the value optimizer's kind"));
    }
    CHECK(same_bits(Mat(s.layer.values().matrix()), before));
  }
  SECTION("the same optimizer everywhere still steps") {
    pkm::optim::RowWiseAdagradOptions o;
    o.max_grad_norm = 0.05;
    pkm::optim::RowWiseAdagrad<float> opt(c.slots(), width, o);
    Stepped s(group);
    CHECK_NOTHROW(s.layer.backward_fused(s.x, s.cache, s.dout, s.dp, opt));
    CHECK(opt.steps() == 1);
  }
}

TEST_CASE("mpi faults: processes saving to the same file are refused before anything is written",
          "[mpi][faults]") {
  dist::Group group(MPI_COMM_WORLD);
  const int me = group.rank(), P = group.size();
  if (P == 1) return;
  const pkm::MemoryConfig c = config();
  dist::MemoryParallelLayer<float> layer(group, c, dist::ColumnShards::even(c.v_dim, P), 4);
  GroupDir dir;
  SECTION("one path for every process (the file held one process's columns)") {
    const std::string path = dir.path + "/layer.safetensors";
    CHECK_THROWS_WITH(dist::save_shard(path, layer), Catch::Contains("would both write"));
    CHECK_FALSE(std::filesystem::exists(path));
  }
  SECTION("the same file spelled differently on the last process") {
    const std::string path =
        me == P - 1 ? dir.path + "/./sub/../layer.safetensors" : dir.path + "/layer.safetensors";
    if (me == 0) std::filesystem::create_directory(dir.path + "/sub");
    MPI_Barrier(MPI_COMM_WORLD);
    CHECK_THROWS_AS(
        dist::save_shard(me == P - 1 || me == 0 ? path : dist::shard_path(dir.path + "/l", me, P),
                         layer),
        std::invalid_argument);
    CHECK_FALSE(std::filesystem::exists(dir.path + "/layer.safetensors"));
  }
  SECTION("an existing file named through a link on one process") {
    const std::string file = dir.path + "/target.safetensors",
                      link = dir.path + "/link.safetensors";
    if (me == 0) {
      std::FILE* f = std::fopen(file.c_str(), "w");
      if (f != nullptr) std::fclose(f);
      std::filesystem::create_symlink(file, link);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    const std::string path = me == 0   ? file
                             : me == 1 ? link
                                       : dist::shard_path(dir.path + "/l", me, P);
    CHECK_THROWS_WITH(dist::save_shard(path, layer), Catch::Contains("would both write"));
    CHECK(std::filesystem::file_size(file) == 0);  // untouched
  }
  SECTION("a file of its own for every process works") {
    CHECK_NOTHROW(dist::save_shard(dist::shard_path(dir.path + "/l", me, P), layer));
    CHECK(std::filesystem::exists(dist::shard_path(dir.path + "/l", me, P)));
  }
}

TEST_CASE(
    "mpi faults: processes failing one call for different reasons each report their own error",
    "[mpi][faults]") {
  dist::Group group(MPI_COMM_WORLD);
  const int me = group.rank(), P = group.size();
  if (P == 1) return;
  const pkm::MemoryConfig c = config();
  dist::MemoryParallelLayer<float> layer(group, c, dist::ColumnShards::even(c.v_dim, P), 2);
  Mat x = input_of(me, false);
  if (me == 0) x = random_matrix(3, c.input_dim + 1, 1);           // the wrong width
  if (me == 1) x(0, 0) = std::numeric_limits<float>::quiet_NaN();  // a NaN
  dist::ParallelForwardCache<float> cache;
  try {
    layer.forward(x, cache);
    FAIL("no error");
  } catch (const std::invalid_argument& e) {
    const std::string what = e.what();
    if (me == 0) CHECK_THAT(what, Catch::Contains("x has 25 columns"));
    if (me == 1) {
      CHECK_THAT(what, Catch::Contains("not finite"));
      CHECK_THAT(what, !Catch::Contains("x has 25 columns"));
    }
    if (me >= 2) {
      CHECK_THAT(what, Catch::Contains("process 0 of the group failed"));
      CHECK_THAT(what, Catch::Contains("processes 0 to 1 failed, each reports its own error"));
      CHECK_THAT(what, Catch::Contains("x has 25 columns"));
    }
  }
}

TEST_CASE("mpi faults: slot statistics whose group sum overflows are refused on every process",
          "[mpi][faults]") {
  dist::Group group(MPI_COMM_WORLD);
  if (group.size() == 1) return;
  pkm::SlotStatistics s(16);
  // Each process holds 2^62 reads of slot 5 (loaded state, as a file would give it).
  s.for_each_state(
      [&](const std::string& name, const std::vector<std::int64_t>&, auto* data, auto...) {
        using T = std::remove_pointer_t<decltype(data)>;
        if constexpr (std::is_same_v<T, std::int64_t>) {
          if (name == "documents") data[0] = 1;
          if (name == "count" || name == "document_count")
            data[5] = name == "count" ? std::int64_t{1} << 62 : 1;
        }
      });
  s.check_consistent("test");
  const auto before = s.counts();
  // Was signed overflow inside the reduction (UBSan) and then a misleading message.
  CHECK_THROWS_WITH(dist::sum_slot_statistics(group, s),
                    Catch::Contains("would overflow a 64-bit counter"));
  CHECK(s.counts() == before);
  CHECK(s.total_reads() == std::int64_t{1} << 62);
}

TEST_CASE("mpi faults: transfers above the message limit are split, with the same bits",
          "[mpi][faults]") {
  // MPI counts are ints: a transfer above 2^31 elements must be split. A group with a limit of
  // a few elements forces every transfer through the split path; everything must equal the
  // default group's results bit for bit.
  const pkm::MemoryConfig c = config();
  struct Result {
    Mat out, dx, dvalues, values_after;
    pkm::LayerParameters<float> dp;
    std::vector<std::int64_t> counts;
    std::vector<double> mass;
    std::uint64_t bytes = 0, messages = 0;
  };
  auto run = [&](Index limit) {
    dist::Group group(MPI_COMM_WORLD, limit);
    const int me = group.rank();
    const dist::ColumnShards shards = split(true);
    dist::MemoryParallelLayer<float> layer(group, c, shards, 13);
    Result r{Mat(), Mat(), Mat(), Mat(), pkm::LayerParameters<float>(c), {}, {}, 0, 0};
    const Mat x = input_of(me, true), dout = dout_of(me, true);
    dist::ParallelForwardCache<float> cache;
    r.out = layer.forward(x, cache);
    r.dp.set_zero();
    pkm::SparseRowGrad<float> dv;
    r.dx.resize(x.rows(), c.input_dim);
    layer.backward(x, cache, dout, r.dp, dv, r.dx);
    r.dvalues = dv.values;
    layer.sum_gradients(r.dp);
    pkm::optim::RowWiseAdagradOptions o;
    o.max_grad_norm = 0.05;
    pkm::optim::RowWiseAdagrad<float> opt(layer.values(), o);
    layer.backward_fused(x, cache, dout, r.dp, opt);
    r.values_after = layer.values().matrix();
    pkm::SlotStatistics stats(c.slots(), true);
    stats.add(cache);
    dist::sum_slot_statistics(group, stats);
    r.counts = stats.counts();
    r.mass = stats.mass();
    r.bytes = group.bytes_sent();
    r.messages = group.messages();
    CHECK(group.max_message_elements() == limit);
    return r;
  };
  const Result ref = run(dist::Group::kMaxMessageElements);
  for (Index limit : {Index{1}, Index{7}}) {
    INFO("message limit " << limit);
    const Result got = run(limit);
    CHECK(same_bits(got.out, ref.out));
    CHECK(same_bits(got.dx, ref.dx));
    CHECK(same_bits(got.dvalues, ref.dvalues));
    CHECK(same_bits(got.values_after, ref.values_after));
    got.dp.for_each([&](pkm::Tensor t, pkm::ConstMatrixMap<float> m) {
      CHECK(same_bits(m, ref.dp.matrix(t)));
    });
    CHECK(got.counts == ref.counts);
    CHECK(got.mass == ref.mass);
    CHECK(got.bytes == ref.bytes);
    if (world_size() > 1) CHECK(got.messages > ref.messages);  // the split path was taken
  }
  // The limit must be valid and the same on every process.
  CHECK_THROWS_WITH(dist::Group(MPI_COMM_WORLD, 0), Catch::Contains("max_message_elements = 0"));
  if (world_size() > 1) {
    CHECK_THROWS_WITH(dist::Group(MPI_COMM_WORLD, world_rank() == 0 ? 5 : 6),
                      Catch::Contains("disagree on max_message_elements"));
  }
}
