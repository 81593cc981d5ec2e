// GPU tests of pkm/cuda/embedding_bag.cuh against pkm's CPU ops (pkm::embedding_bag,
// pkm::embedding_bag_backward), every mode and dtype, random and adversarial inputs; the
// deterministic backward bitwise identical across two runs. Without a CUDA device it prints
// why and exits 77, which CTest reports as skipped (never as passed).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <pkm/pkm.hpp>

#include "runner.hpp"

namespace {

using pkm::Dtype;
using pkm::Index;
using pkm::cuda::GradOutput;
using pkm::cuda::Reduction;
using pkm::cuda::Status;
using Mat = pkm::RowMatrix<float>;

int failures = 0, checks = 0;

#define EXPECT(cond, ...)                                             \
  do {                                                                \
    ++checks;                                                         \
    if (!(cond)) {                                                    \
      ++failures;                                                     \
      std::printf("FAILED %s:%d: %s -- ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                       \
      std::printf("\n");                                              \
    }                                                                 \
  } while (0)

struct Shape {
  Dtype dtype;
  Index rows, dim, stride, tokens, heads, knn;
  bool hot = false;  // every read is the same slot
};

const char* name(Dtype t) { return t == Dtype::f32 ? "f32" : t == Dtype::bf16 ? "bf16" : "f16"; }

/// The table as the CPU sees it (a strided view of the bytes the GPU gets).
struct Case {
  Shape s;
  pkm_cuda_test::HostTable table;
  std::vector<std::int64_t> idx;
  std::vector<float> scores, dy;
};

template <class T>
void fill_table(pkm_cuda_test::HostTable& t, std::mt19937_64& rng) {
  std::normal_distribution<float> n(0.f, 1.f);
  t.bytes.assign(std::size_t(t.rows * t.stride) * sizeof(T), 0);
  T* p = reinterpret_cast<T*>(t.bytes.data());
  for (Index i = 0; i < t.rows * t.stride; ++i) p[i] = T(n(rng));
}

Case make_case(const Shape& s, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  Case c{s, {}, {}, {}, {}};
  c.table.dtype = s.dtype;
  c.table.rows = s.rows;
  c.table.dim = s.dim;
  c.table.stride = s.stride;
  if (s.dtype == Dtype::f32) fill_table<float>(c.table, rng);
  if (s.dtype == Dtype::bf16) fill_table<pkm::bf16>(c.table, rng);
  if (s.dtype == Dtype::f16) fill_table<pkm::fp16>(c.table, rng);
  const Index n = s.tokens * s.heads * s.knn;
  std::uniform_int_distribution<std::int64_t> slot(0, s.rows - 1);
  std::normal_distribution<float> g(0.f, 1.f);
  for (Index i = 0; i < n; ++i) c.idx.push_back(s.hot ? 5 % s.rows : slot(rng));
  for (Index i = 0; i < n; ++i) c.scores.push_back(g(rng));
  for (Index i = 0; i < s.tokens * s.dim; ++i) c.dy.push_back(g(rng));
  return c;
}

/// Softmax per head in double, as the reference weights.
std::vector<float> softmax(const Case& c) {
  std::vector<float> w(c.scores.size());
  for (Index t = 0; t < c.s.tokens; ++t) {
    for (Index h = 0; h < c.s.heads; ++h) {
      const float* x = c.scores.data() + (t * c.s.heads + h) * c.s.knn;
      double m = -INFINITY, z = 0;
      for (Index e = 0; e < c.s.knn; ++e) m = std::max(m, double(x[e]));
      for (Index e = 0; e < c.s.knn; ++e) z += std::exp(double(x[e]) - m);
      for (Index e = 0; e < c.s.knn; ++e)
        w[std::size_t((t * c.s.heads + h) * c.s.knn + e)] = float(std::exp(double(x[e]) - m) / z);
    }
  }
  return w;
}

/// Calls fn(ValueTable<T>) with a view of the case's table in its dtype.
template <class Fn>
void with_table(Case& c, Fn&& fn) {
  auto* data = c.table.bytes.data();
  if (c.s.dtype == Dtype::f32)
    fn(pkm::ValueTable<float>::view(reinterpret_cast<float*>(data), c.s.rows, c.s.dim, c.s.stride));
  if (c.s.dtype == Dtype::bf16)
    fn(pkm::ValueTable<pkm::bf16>::view(reinterpret_cast<pkm::bf16*>(data), c.s.rows, c.s.dim,
                                        c.s.stride));
  if (c.s.dtype == Dtype::f16)
    fn(pkm::ValueTable<pkm::fp16>::view(reinterpret_cast<pkm::fp16*>(data), c.s.rows, c.s.dim,
                                        c.s.stride));
}

double max_rel(const float* a, const float* b, std::size_t n) {
  double err = 0, scale = 1e-6;
  for (std::size_t i = 0; i < n; ++i) scale = std::max(scale, std::fabs(double(b[i])));
  for (std::size_t i = 0; i < n; ++i) {
    const double d = std::fabs(double(a[i]) - double(b[i]));
    if (!(d <= err)) err = std::isnan(d) ? INFINITY : d;
  }
  return err / scale;
}

void test_forward(Case& c, bool fused_softmax) {
  const Index bag = c.s.heads * c.s.knn;
  const std::vector<float> w = fused_softmax ? softmax(c) : c.scores;
  Mat ref(c.s.tokens, c.s.dim);
  pkm::IndexMatrix idx = Eigen::Map<const pkm::IndexMatrix>(c.idx.data(), c.s.tokens, bag);
  const Mat wm = Eigen::Map<const Mat>(w.data(), c.s.tokens, bag);
  with_table(c, [&](auto table) { pkm::embedding_bag(table, idx, wm, ref); });
  pkm_cuda_test::ForwardCall call;
  call.indices = c.idx;
  call.tokens = c.s.tokens;
  call.heads = c.s.heads;
  call.knn = c.s.knn;
  call.weights = c.scores;
  call.softmax = fused_softmax;
  call.out_stride = c.s.dim + 5;  // a strided output
  if (!fused_softmax) call.weights = w;
  const auto r = pkm_cuda_test::run_forward(c.table, call);
  EXPECT(r.status == Status::ok, "forward %s dim %lld: %s", name(c.s.dtype), (long long)c.s.dim,
         r.why.c_str());
  if (r.status != Status::ok) return;
  Mat got(c.s.tokens, c.s.dim);
  for (Index t = 0; t < c.s.tokens; ++t) {
    for (Index d = 0; d < c.s.dim; ++d) got(t, d) = r.out[std::size_t(t * call.out_stride + d)];
  }
  const double err = max_rel(got.data(), ref.data(), std::size_t(got.size()));
  EXPECT(err < 2e-5,
         "forward %s dim %lld stride %lld tokens %lld bag %lldx%lld softmax %d: max error %.3g of "
         "the largest",
         name(c.s.dtype), (long long)c.s.dim, (long long)c.s.stride, (long long)c.s.tokens,
         (long long)c.s.heads, (long long)c.s.knn, int(fused_softmax), err);
  if (fused_softmax) {
    EXPECT(max_rel(r.weights.data(), w.data(), w.size()) < 1e-5, "fused softmax weights %s",
           name(c.s.dtype));
  }
}

void test_backward(Case& c, bool softmax_backward) {
  const Index bag = c.s.heads * c.s.knn;
  const std::vector<float> w = softmax(c);
  pkm::IndexMatrix idx = Eigen::Map<const pkm::IndexMatrix>(c.idx.data(), c.s.tokens, bag);
  const Mat wm = Eigen::Map<const Mat>(w.data(), c.s.tokens, bag);
  const Mat dy = Eigen::Map<const Mat>(c.dy.data(), c.s.tokens, c.s.dim);
  Mat dw(c.s.tokens, bag);
  pkm::SparseRowGrad<float> ref;
  ref.dim = c.s.dim;
  pkm::BagBackwardScratch<float> scratch;
  with_table(
      c, [&](auto table) { pkm::embedding_bag_backward(table, idx, wm, dy, dw, ref, scratch); });
  Mat dscore = dw;
  if (softmax_backward) {  // w * (dw - sum over the head of w * dw)
    for (Index t = 0; t < c.s.tokens; ++t) {
      for (Index h = 0; h < c.s.heads; ++h) {
        double s = 0;
        for (Index e = 0; e < c.s.knn; ++e)
          s += double(wm(t, h * c.s.knn + e)) * dw(t, h * c.s.knn + e);
        for (Index e = 0; e < c.s.knn; ++e)
          dscore(t, h * c.s.knn + e) = wm(t, h * c.s.knn + e) * float(dw(t, h * c.s.knn + e) - s);
      }
    }
  }
  pkm_cuda_test::BackwardCall call;
  call.indices = c.idx;
  call.tokens = c.s.tokens;
  call.heads = c.s.heads;
  call.knn = c.s.knn;
  call.weights = w;
  call.dy = c.dy;
  call.softmax_backward = softmax_backward;
  // Sparse, deterministic, twice: the same bits.
  const auto a = pkm_cuda_test::run_backward(c.table, call);
  const auto b = pkm_cuda_test::run_backward(c.table, call);
  EXPECT(a.status == Status::ok, "backward %s: %s", name(c.s.dtype), a.why.c_str());
  if (a.status != Status::ok) return;
  EXPECT(a.unique == ref.rows, "sparse rows %s dim %lld: %zu unique, expected %zu", name(c.s.dtype),
         (long long)c.s.dim, a.unique.size(), ref.rows.size());
  if (a.unique == ref.rows) {
    EXPECT(max_rel(a.rows.data(), ref.values.data(), a.rows.size()) < 2e-5,
           "sparse gradient values %s dim %lld", name(c.s.dtype), (long long)c.s.dim);
  }
  EXPECT(a.unique == b.unique && a.rows.size() == b.rows.size() &&
             std::memcmp(a.rows.data(), b.rows.data(), a.rows.size() * 4) == 0 &&
             std::memcmp(a.dweights.data(), b.dweights.data(), a.dweights.size() * 4) == 0,
         "deterministic backward differs between two runs (%s dim %lld)", name(c.s.dtype),
         (long long)c.s.dim);
  EXPECT(max_rel(a.dweights.data(), dscore.data(), a.dweights.size()) < 2e-5,
         "%s gradient %s dim %lld", softmax_backward ? "scores'" : "weights'", name(c.s.dtype),
         (long long)c.s.dim);
  // Dense, deterministic and atomic, added into an existing gradient.
  std::mt19937_64 rng(7);
  std::normal_distribution<float> g;
  std::vector<float> dense0(std::size_t(c.s.rows * c.s.dim));
  for (auto& v : dense0) v = g(rng);
  Mat expect = Eigen::Map<const Mat>(dense0.data(), c.s.rows, c.s.dim);
  ref.add_to(expect);
  for (Reduction red : {Reduction::deterministic, Reduction::atomic}) {
    call.output = GradOutput::dense_add;
    call.reduction = red;
    call.dense = dense0;
    call.want_dweights = false;
    const auto d = pkm_cuda_test::run_backward(c.table, call);
    EXPECT(d.status == Status::ok, "dense backward: %s", d.why.c_str());
    if (d.status == Status::ok) {
      EXPECT(max_rel(d.dense.data(), expect.data(), d.dense.size()) < 2e-5,
             "dense %s gradient %s dim %lld", red == Reduction::atomic ? "atomic" : "deterministic",
             name(c.s.dtype), (long long)c.s.dim);
    }
  }
}

void test_index_check() {
  Case c = make_case({Dtype::f32, 50, 16, 16, 9, 2, 3}, 3);
  c.idx[17] = 50;  // one past the table
  pkm_cuda_test::ForwardCall call;
  call.indices = c.idx;
  call.tokens = 9;
  call.heads = 2;
  call.knn = 3;
  call.weights = c.scores;
  call.out_stride = 16;
  call.check = true;
  const auto r = pkm_cuda_test::run_forward(c.table, call);
  EXPECT(r.status == Status::index_out_of_range, "forward check: status %s",
         pkm::cuda::status_name(r.status));
  bool untouched = true;  // the runner filled out with 0xff bytes before the call
  for (float v : r.out) {
    std::uint32_t bits;
    std::memcpy(&bits, &v, 4);
    untouched = untouched && bits == 0xffffffffu;
  }
  EXPECT(untouched, "the forward wrote out although an index was out of range");
  pkm_cuda_test::BackwardCall b;
  b.indices = c.idx;
  b.tokens = 9;
  b.heads = 2;
  b.knn = 3;
  b.weights = c.scores;
  b.dy = c.dy;
  b.check = true;
  EXPECT(pkm_cuda_test::run_backward(c.table, b).status == Status::index_out_of_range,
         "backward check");
}

}  // namespace

int main() {
  std::string why;
  if (!pkm_cuda_test::device_available(&why)) {
    std::printf("pkm CUDA GPU tests: skipped, no usable CUDA device (%s)\n", why.c_str());
    return 77;
  }
  // PKM_CUDA_TESTS_QUICK=1 (under compute-sanitizer, which runs kernels many times slower):
  // the small shapes only.
  const bool quick = std::getenv("PKM_CUDA_TESTS_QUICK") != nullptr;
  std::vector<Shape> shapes;
  for (Dtype t : {Dtype::f32, Dtype::bf16, Dtype::f16}) {
    for (Index dim : {1, 7, 100, 256, 1024, 4097}) {
      if (quick && dim > 256) continue;
      shapes.push_back({t, 300, dim, dim, 37, 2, 3});
      if (!quick)
        shapes.push_back({t, 1000, dim, dim + 8, 130, 4, 32});  // a padded stride, the paper's bag
    }
    shapes.push_back({t, 64, 96, 96, 200, 4, 8, true});  // one hot slot read by every token
    shapes.push_back({t, 10, 64, 64, 1, 1, 1});          // bag of 1, one token
  }
  std::uint64_t seed = 100;
  for (const Shape& s : shapes) {
    Case c = make_case(s, ++seed);
    test_forward(c, false);
    test_forward(c, true);
    test_backward(c, false);
    test_backward(c, true);
  }
  test_index_check();
  std::printf("pkm CUDA GPU tests: %d checks, %d failed\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
