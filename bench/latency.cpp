// pkm_bench's decoding benchmark: one forward of a few tokens at a time, as an inference engine
// runs a memory layer, at the quickstart's shape (d = 1024, 4 heads, knn 32, k_dim 512, 512^2
// slots x 1024 values: a 1 GiB fp32 / 0.5 GiB bf16 table). Each call is timed on its own;
// the counters give the median and 99th percentile in microseconds over the calls run (run
// with --benchmark_min_time=2 or more for >= 1000 calls at batch 1).
//
// The limit, measured in the same process outside pkm: the bytes one forward must read (every
// dense parameter once, and the value rows of its bag) at the bandwidth of a plain streaming
// read of a 1 GiB buffer (Eigen's vectorised sum over the threads, as BM_StreamRead). The
// dense weights (20 MiB) may stay in a large L3 from call to call, so pkm can beat it.
#include <benchmark/benchmark.h>

#include <pkm/pkm.hpp>

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace {

using pkm::Index;
using MatF = pkm::RowMatrix<float>;

pkm::MemoryConfig quickstart_shape() {
  pkm::MemoryConfig c;
  c.input_dim = 1024;
  c.heads = 4;
  c.n_keys = 512;
  c.k_dim = 512;
  c.knn = 32;
  c.v_dim = 1024;
  c.output_dim = 1024;
  return c;
}

/// Bytes per second of a streaming read of 1 GiB over the threads (the best of 3 passes).
double stream_read_bandwidth() {
  const Index n = Index{1} << 28;  // floats
  std::vector<float> buf(static_cast<std::size_t>(n));
#pragma omp parallel for schedule(static)
  for (Index i = 0; i < n; ++i) buf[static_cast<std::size_t>(i)] = float(i % 7);
  constexpr Index kChunk = Index(1) << 16;
  double best = 0;
  for (int pass = 0; pass < 3; ++pass) {
    const auto t0 = std::chrono::steady_clock::now();
    float total = 0;
#pragma omp parallel for reduction(+ : total) schedule(static)
    for (Index i = 0; i < n; i += kChunk)
      total += Eigen::Map<const Eigen::VectorXf>(buf.data() + i, std::min(kChunk, n - i)).sum();
    benchmark::DoNotOptimize(total);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, double(n) * sizeof(float) / s);
  }
  return best;
}

/// args: batch, threads; T: the table's type.
template <class T>
void BM_DecodeLatency(benchmark::State& state) {
  const Index batch = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  const int saved_threads = omp_get_max_threads();
  omp_set_num_threads(threads);
  const auto c = quickstart_shape();
  pkm::MemoryLayer<float, T> layer(c, 11);
  // 64 different inputs, used in turn: each call searches and reads other rows.
  constexpr int kInputs = 64;
  std::vector<MatF> xs;
  for (int i = 0; i < kInputs; ++i) {
    MatF x(batch, c.input_dim);
    for (Index e = 0; e < x.size(); ++e) x.data()[e] = float(std::sin(0.37 * double(e) + i));
    xs.push_back(std::move(x));
  }
  MatF y(batch, c.output_dim);
  pkm::ForwardCache<float> cache;
  for (int i = 0; i < 4; ++i) layer.forward(xs[i], y, cache);  // warm: buffers sized, checked
  double dense_bytes = 0;
  std::as_const(layer).params().for_each(
      [&](pkm::Tensor, pkm::ConstMatrixMap<float> m) { dense_bytes += double(m.size()) * 4; });
  const double bytes =
      dense_bytes + double(batch * c.bag_size() * c.v_dim) * sizeof(T);  // rows: at most these
  const double bandwidth = stream_read_bandwidth();

  std::vector<double> us;
  int next = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    layer.forward(xs[next], y, cache);
    us.push_back(
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
    next = (next + 1) % kInputs;
    benchmark::DoNotOptimize(y.data());
  }
  std::sort(us.begin(), us.end());
  const double p50 = us[us.size() / 2], p99 = us[std::min(us.size() - 1, us.size() * 99 / 100)];
  const double limit = bytes / bandwidth * 1e6;
  state.counters["p50_us"] = p50;
  state.counters["p99_us"] = p99;
  state.counters["limit_us"] = limit;
  state.counters["p50_per_limit"] = p50 / limit;
  state.counters["MiB_read"] = bytes / (1 << 20);
  state.counters["calls"] = double(us.size());
  state.SetItemsProcessed(std::int64_t(state.iterations()) * batch);
  omp_set_num_threads(saved_threads);
}

void decode_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"batch", "threads"});
  for (int threads : {1, 2})
    for (int batch : {1, 8, 64}) b->Args({batch, threads});
  b->Unit(benchmark::kMicrosecond)->UseRealTime();
}
BENCHMARK_TEMPLATE(BM_DecodeLatency, float)->Apply(decode_args);
BENCHMARK_TEMPLATE(BM_DecodeLatency, pkm::bf16)->Apply(decode_args);

}  // namespace
