// The CUDA path's host side, on the CPU: the index arithmetic of the kernels (which thread
// handles which token and columns, where the value gradient's segments start, how the
// workspace is carved) covers every element exactly once for awkward shapes, and the
// argument checks refuse every bad argument with the right status and a message naming it.
// (The kernels themselves run in tests/cuda/gpu_tests.cpp, on a GPU.)
#include <catch2/catch.hpp>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <pkm/cuda/args.hpp>
#include <pkm/cuda/layout.hpp>

namespace {

namespace pc = pkm::cuda;
namespace pcd = pkm::cuda::detail;

/// Marks the columns every lane of one token's sub-warp reads; each must be read once.
void check_row_coverage(const pcd::RowLayout& l) {
  std::vector<int> hits(static_cast<std::size_t>(l.dim), 0);
  for (int lane = 0; lane < l.lanes; ++lane) {
    for (std::int64_t i = 0; i < l.iterations(); ++i) {
      const std::int64_t col = l.column(lane, i);
      if (col >= l.dim) continue;
      REQUIRE(col + l.vec <= l.dim);  // a vector never straddles the row's end
      REQUIRE(col % l.vec == 0);      // and starts on a vector boundary
      for (int e = 0; e < l.vec; ++e) ++hits[static_cast<std::size_t>(col + e)];
    }
  }
  for (std::size_t c = 0; c < hits.size(); ++c) {
    INFO("dim " << l.dim << " vec " << l.vec << " lanes " << l.lanes << " column " << c);
    REQUIRE(hits[c] == 1);
  }
}

pc::Status check_args(const pc::ForwardArgs& a, std::string* why) {
  return pc::check_forward(a, why);
}
pc::Status check_args(const pc::BackwardArgs& a, std::string* why) {
  return pc::check_backward(a, why);
}

/// The host check refuses `args` with status s, in a message that starts with the status and
/// names `field` (with its value, where given).
template <class Args>
void expect_refused(const Args& args, pc::Status s, const std::string& field) {
  std::string why;
  CHECK(check_args(args, &why) == s);
  CHECK(why.find(field) != std::string::npos);
  CHECK(why.find(pc::status_name(s)) == 0);
}

}  // namespace

TEST_CASE("cuda layout: every column of a row is read exactly once, in whole vectors", "[cuda]") {
  for (std::int64_t dim : {1, 2, 7, 8, 100, 255, 256, 1000, 1024, 4096, 4097}) {
    for (pkm::Dtype t : {pkm::Dtype::f32, pkm::Dtype::bf16, pkm::Dtype::f16}) {
      for (std::int64_t pad : {0, 1, 8}) {
        for (std::uintptr_t base : {std::uintptr_t(0x1000), std::uintptr_t(0x1008)}) {
          const std::int64_t stride = dim + pad;
          const pcd::RowLayout l = pcd::row_layout(t, base, stride, dim);
          // Vectors only where every row start is 16-byte aligned and the width divides.
          const int esize = pc::dtype_bytes(t);
          const bool vectorisable =
              base % 16 == 0 && (stride * esize) % 16 == 0 && dim % (16 / esize) == 0;
          CHECK(l.vec == (vectorisable ? 16 / esize : 1));
          CHECK(l.lanes >= 4);
          CHECK(l.lanes <= 32);
          CHECK((l.lanes & (l.lanes - 1)) == 0);
          CHECK(32 % l.lanes == 0);
          check_row_coverage(l);
        }
      }
    }
  }
  // Narrow rows pack several tokens into a warp; wide ones use the whole warp.
  CHECK(pcd::lanes_for(1, 1) == 4);
  CHECK(pcd::lanes_for(100, 4) == 32);
  CHECK(pcd::lanes_for(64, 8) == 8);
  CHECK(pcd::row_layout(pkm::Dtype::bf16, 0x1000, 4096, 4096).vec == 8);
  CHECK(pcd::row_layout(pkm::Dtype::f32, 0x1000, 4097, 4097).vec == 1);  // any v_dim: scalars
}

TEST_CASE("cuda layout: every token gets one whole sub-warp, and threads past the batch none",
          "[cuda]") {
  for (int lanes : {4, 8, 16, 32}) {
    for (std::int64_t tokens : {1, 5, 33, 64, 1000, 4097}) {
      const std::int64_t blocks = pcd::blocks_for(tokens, lanes, 256);
      const std::int64_t threads = blocks * 256;
      CHECK(threads >= tokens * lanes);
      CHECK(threads - 256 < tokens * lanes);  // no block more than needed
      std::vector<std::vector<int>> lanes_of(static_cast<std::size_t>(tokens));
      for (std::int64_t th = 0; th < threads; ++th) {
        const std::int64_t t = pcd::token_of(th, lanes);
        const int lane = pcd::lane_of(th, lanes);
        REQUIRE(lane >= 0);
        REQUIRE(lane < lanes);
        // A token's sub-warp lies inside one warp (shuffles stay within it).
        REQUIRE(th / 32 == (th - lane) / 32);
        if (t < tokens) lanes_of[static_cast<std::size_t>(t)].push_back(lane);
      }
      for (auto& l : lanes_of) {
        std::sort(l.begin(), l.end());
        REQUIRE(l.size() == static_cast<std::size_t>(lanes));
        for (int i = 0; i < lanes; ++i) REQUIRE(l[static_cast<std::size_t>(i)] == i);
      }
    }
  }
}

TEST_CASE("cuda layout: the value gradient's segments cover every (slot, position) pair once",
          "[cuda]") {
  std::mt19937_64 rng(3);
  auto check = [](const std::vector<std::int64_t>& idx, std::int64_t rows) {
    // The device's steps, on the CPU: sort pairs by slot (stable), run-length encode,
    // exclusive scan of the run lengths, segment u = [offsets[u], offsets[u] + counts[u]).
    std::vector<int> pos(idx.size());
    for (std::size_t p = 0; p < pos.size(); ++p) pos[p] = int(p);
    std::stable_sort(pos.begin(), pos.end(),
                     [&](int a, int b) { return idx[std::size_t(a)] < idx[std::size_t(b)]; });
    std::vector<std::int64_t> unique;
    std::vector<int> counts;
    for (int p : pos) {
      if (unique.empty() || unique.back() != idx[std::size_t(p)]) {
        unique.push_back(idx[std::size_t(p)]);
        counts.push_back(0);
      }
      ++counts.back();
    }
    std::vector<int> offsets(counts.size());
    for (std::size_t u = 1; u < counts.size(); ++u) offsets[u] = offsets[u - 1] + counts[u - 1];
    std::vector<int> seen(idx.size(), 0);
    for (std::size_t u = 0; u < unique.size(); ++u) {
      const pcd::Segment s = pcd::segment(offsets.data(), counts.data(), std::int64_t(u));
      REQUIRE(s.count >= 1);
      int last = -1;
      for (std::int64_t k = 0; k < s.count; ++k) {
        const int p = pos[std::size_t(s.begin + k)];
        REQUIRE(idx[std::size_t(p)] == unique[u]);  // every pair of the segment is this slot's
        REQUIRE(p > last);                          // in ascending position: a fixed order
        last = p;
        ++seen[std::size_t(p)];
      }
    }
    for (int v : seen) REQUIRE(v == 1);
    // The sort's key bits hold every slot id.
    const int bits = pcd::slot_bits(rows);
    for (auto i : idx) REQUIRE((std::uint64_t(i) >> bits) == 0);
  };
  std::vector<std::int64_t> random(4096);
  for (auto& v : random) v = std::int64_t(rng() % 1000);
  check(random, 1000);
  check(std::vector<std::int64_t>(777, 5), 1000);  // one hot slot read by every token
  check({3}, 10);                                  // bag 1, one token
  std::vector<std::int64_t> distinct(300);
  for (std::size_t i = 0; i < distinct.size(); ++i) distinct[i] = std::int64_t(299 - i);
  check(distinct, 300);
  CHECK(pcd::slot_bits(1) == 1);
  CHECK(pcd::slot_bits(2) == 1);
  CHECK(pcd::slot_bits(3) == 2);
  CHECK(pcd::slot_bits(1024) == 10);
  CHECK(pcd::slot_bits(1025) == 11);
  CHECK(pcd::slot_bits(std::int64_t(1) << 20) == 20);
  CHECK(pcd::slot_bits(INT_MAX) == 31);
}

TEST_CASE("cuda layout: the workspace's buffers are aligned, disjoint and large enough", "[cuda]") {
  for (std::int64_t n : {0, 1, 3, 1000, 262144}) {
    for (std::size_t cub : {std::size_t(0), std::size_t(1), std::size_t(12345)}) {
      const pcd::BackwardWorkspace w = pcd::backward_workspace(n, cub);
      const std::size_t un = std::size_t(n);
      struct Part {
        std::size_t at, bytes;
      };
      const std::vector<Part> parts = {
          {w.keys_in, un * 8}, {w.keys_out, un * 8}, {w.pos_in, un * 4},  {w.pos_out, un * 4},
          {w.unique, un * 8},  {w.counts, un * 4},   {w.offsets, un * 4}, {w.num_runs, 4},
          {w.flag, 4},         {w.cub, cub}};
      for (std::size_t i = 0; i < parts.size(); ++i) {
        CHECK(parts[i].at % pcd::kWorkspaceAlign == 0);
        CHECK(parts[i].at + parts[i].bytes <= w.total);
        for (std::size_t j = i + 1; j < parts.size(); ++j) {
          const bool disjoint = parts[i].at + parts[i].bytes <= parts[j].at ||
                                parts[j].at + parts[j].bytes <= parts[i].at;
          CHECK(disjoint);
        }
      }
    }
  }
  CHECK(pcd::forward_workspace() >= 4);  // never 0: a null workspace always means "query"
  CHECK(pcd::backward_workspace(0, 0).total > 0);
}

TEST_CASE("cuda arguments: every bad argument gets its status and a message naming it",
          "[cuda][errors]") {
  alignas(16) static float buf[64];
  static std::int64_t idx[64];
  pc::ForwardArgs f;
  f.table = {buf, pkm::Dtype::f32, 10, 4, 4};
  f.bag = {idx, 3, 2, 2};
  f.weights = buf;
  f.out = buf;
  f.out_stride = 4;
  std::string why;
  REQUIRE(pc::check_forward(f, &why) == pc::Status::ok);

  auto a = f;
  a.table.data = nullptr;
  expect_refused(a, pc::Status::null_pointer, "table.data");
  a = f, a.table.rows = 0;
  expect_refused(a, pc::Status::bad_size, "table.rows = 0");
  a = f, a.table.rows = std::int64_t(INT_MAX) + 1;
  expect_refused(a, pc::Status::bad_size, "table.rows");
  a = f, a.table.dim = -3;
  expect_refused(a, pc::Status::bad_size, "table.dim = -3");
  a = f, a.table.stride = 3;
  expect_refused(a, pc::Status::bad_stride, "table.stride = 3");
  a = f, a.table.data = reinterpret_cast<const char*>(buf) + 2;
  expect_refused(a, pc::Status::misaligned, "table.data");
  a = f, a.table.dtype = pkm::Dtype::bf16, a.table.data = reinterpret_cast<const char*>(buf) + 1;
  expect_refused(a, pc::Status::misaligned, "2-byte");
  a = f, a.table.rows = INT_MAX, a.table.stride = std::int64_t(1) << 40;
  expect_refused(a, pc::Status::bad_size, "too large");
  a = f, a.bag.tokens = -1;
  expect_refused(a, pc::Status::bad_size, "bag.tokens = -1");
  a = f, a.bag.knn = 0;
  expect_refused(a, pc::Status::bad_size, "bag.knn = 0");
  a = f, a.bag.heads = 0;
  expect_refused(a, pc::Status::bad_size, "bag.heads = 0");
  a = f, a.bag.tokens = std::int64_t(1) << 30;
  expect_refused(a, pc::Status::bad_size, "2^31 - 1");
  a = f, a.bag.indices = nullptr;
  expect_refused(a, pc::Status::null_pointer, "bag.indices");
  a = f, a.weights = nullptr;
  expect_refused(a, pc::Status::null_pointer, "weights");
  a = f, a.fused_softmax = true;
  expect_refused(a, pc::Status::null_pointer, "weights_out");
  a = f, a.out = nullptr;
  expect_refused(a, pc::Status::null_pointer, "out");
  a = f, a.out_stride = 2;
  expect_refused(a, pc::Status::bad_stride, "out_stride = 2");
  a = f, a.out = reinterpret_cast<float*>(reinterpret_cast<char*>(buf) + 1);
  expect_refused(a, pc::Status::misaligned, "out");
  // An empty batch is valid and needs no other pointer.
  a = f, a.bag.tokens = 0, a.bag.indices = nullptr, a.weights = nullptr, a.out = nullptr;
  CHECK(pc::check_forward(a) == pc::Status::ok);

  pc::BackwardArgs b;
  b.table = f.table;
  b.bag = f.bag;
  b.weights = buf;
  b.dy = buf;
  b.dy_stride = 4;
  b.unique_slots = idx;
  b.grad_rows = buf;
  b.num_unique = idx;
  REQUIRE(pc::check_backward(b, &why) == pc::Status::ok);
  auto c = b;
  c.reduction = pc::Reduction::atomic;  // atomics only into a dense gradient
  expect_refused(c, pc::Status::bad_mode, "atomic");
  c = b, c.num_unique = nullptr;
  expect_refused(c, pc::Status::null_pointer, "num_unique");
  c = b, c.unique_slots = nullptr;
  expect_refused(c, pc::Status::null_pointer, "unique_slots");
  c = b, c.grad_rows = nullptr;
  expect_refused(c, pc::Status::null_pointer, "grad_rows");
  c = b, c.dy_stride = 1;
  expect_refused(c, pc::Status::bad_stride, "dy_stride = 1");
  c = b, c.dy = nullptr;
  expect_refused(c, pc::Status::null_pointer, "dy");
  c = b, c.output = pc::GradOutput::dense_add;
  expect_refused(c, pc::Status::null_pointer, "dense");
  c.dense = buf, c.dense_stride = 3;
  expect_refused(c, pc::Status::bad_stride, "dense_stride = 3");
  c.dense_stride = 4, c.reduction = pc::Reduction::atomic;
  CHECK(pc::check_backward(c) == pc::Status::ok);
  c = b, c.output = static_cast<pc::GradOutput>(7);
  expect_refused(c, pc::Status::bad_mode, "output = 7");
  c = b, c.table.dim = 0;
  expect_refused(c, pc::Status::bad_size, "table.dim = 0");
  c = b, c.dweights = reinterpret_cast<float*>(reinterpret_cast<char*>(buf) + 2);
  expect_refused(c, pc::Status::misaligned, "dweights");
}
