// pkm_bench's decoding benchmark: one forward of a few tokens at a time, as an inference engine
// runs a memory layer, at the quickstart's shape (d = 1024, 4 heads, knn 32, k_dim 512, 512^2
// slots x 1024 values: a 1 GiB fp32 / 0.5 GiB bf16 table). Each call is timed on its own;
// the counters give the median and 99th percentile in microseconds over the calls run (run
// with --benchmark_min_time=2 or more for >= 1000 calls at batch 1).
//
// Two limits, measured in the same process outside pkm, for the bytes one forward must read
// (every dense parameter once, and the value rows of its bag):
//   limit_us       all of them at the bandwidth of a plain streaming read of a 1 GiB buffer
//                  (Eigen's vectorised sum over the threads, as BM_StreamRead);
//   warm_limit_us  the dense parameters at the bandwidth of the same read of a buffer of their
//                  size, read again and again (it stays in the caches where it fits, as the
//                  layer's weights do from call to call), and the rows as in limit_us.
// The dense weights (20 MiB) stay in a large L3 from call to call, so pkm can beat limit_us;
// warm_limit_us is the one a decoding call can be held to on such a CPU.
#include <benchmark/benchmark.h>

#include <pkm/pkm.hpp>

#include "common.hpp"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using pkm::Index;
using MatF = pkm::RowMatrix<float>;

using pkmbench::quickstart_shape;

/// Bytes per second of reading a buffer of `bytes` over the threads (Eigen's vectorised sum,
/// as BM_StreamRead): the best of at least `passes` timed passes, more while they took under
/// `min_seconds`, after `untimed` passes.
double read_bandwidth(double bytes, int untimed, int passes, double min_seconds) {
  const Index n = std::max<Index>(1, Index(bytes / sizeof(float)));
  std::vector<float> buf(static_cast<std::size_t>(n));
#pragma omp parallel for schedule(static)
  for (Index i = 0; i < n; ++i) buf[static_cast<std::size_t>(i)] = float(i % 7);
  for (int pass = 0; pass < untimed; ++pass)
    benchmark::DoNotOptimize(pkmbench::stream_sum(buf.data(), n));
  double best = 0, spent = 0;
  for (int pass = 0; pass < passes || spent < min_seconds; ++pass) {
    const auto t0 = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(pkmbench::stream_sum(buf.data(), n));
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    spent += s;
    best = std::max(best, double(n) * sizeof(float) / s);
  }
  return best;
}

/// A streaming read of 1 GiB (the best of 3 passes): data that comes from memory.
double stream_read_bandwidth() { return read_bandwidth(double(std::int64_t{1} << 30), 0, 3, 0); }

/// Reading a buffer of `bytes` again and again (the best of the passes after a first one, for
/// at least 0.2 s): a buffer that fits the caches is read from them.
double warm_read_bandwidth(double bytes) { return read_bandwidth(bytes, 1, 20, 0.2); }

/// What the decoding benchmarks share, built at the first run that needs it (so a filter that
/// skips them costs nothing): one layer per table type with its 1 GiB table filled, and the
/// streaming bandwidth per thread count.
struct DecodeFixture {
  std::unique_ptr<pkm::MemoryLayer<float, float>> fp32;
  std::unique_ptr<pkm::MemoryLayer<float, pkm::bf16>> bf16;
  /// The fp32 layer's parameters and table (a view, no second copy) with bf16 products.
  std::unique_ptr<pkm::MemoryLayer<float, float>> fp32_bf16_products;
  /// The same with the key search's scores in bf16 too (MemoryConfig::score_compute).
  std::unique_ptr<pkm::MemoryLayer<float, float>> fp32_bf16_scores;
  /// The fp32 layer's parameters with its table quantized, per format.
  std::map<pkm::Dtype, std::unique_ptr<pkm::MemoryLayer<float, pkm::Quantized>>> quantized;
  std::map<int, double> bandwidth;

  const pkm::MemoryLayer<float, pkm::Quantized>& quantized_layer(pkm::Dtype format) {
    auto& slot = quantized[format];
    if (!slot) {
      const auto& base = layer<float>();
      slot = std::make_unique<pkm::MemoryLayer<float, pkm::Quantized>>(
          base.params(), pkm::quantize(base.values(), format));
    }
    return *slot;
  }

  template <class T>
  const pkm::MemoryLayer<float, T>& layer(bool bf16_products = false, bool bf16_scores = false) {
    if constexpr (std::is_same_v<T, float>) {
      if (bf16_products) {
        auto& slot = bf16_scores ? fp32_bf16_scores : fp32_bf16_products;
        if (!slot) {
          const auto& base = layer<float>();
          pkm::LayerParameters<float> p = base.params();
          p.set_compute(pkm::Dtype::bf16);
          if (bf16_scores) p.set_score_compute(pkm::Dtype::bf16);
          slot = std::make_unique<pkm::MemoryLayer<float, float>>(std::move(p),
                                                                  base.values().view());
        }
        return *slot;
      }
    }
    auto& slot = [this]() -> auto& {
      if constexpr (std::is_same_v<T, float>)
        return fp32;
      else
        return bf16;
    }
    ();
    if (!slot) {
      const auto c = quickstart_shape();
      pkm::ValueTable<T> table(c.slots(), c.v_dim);
      pkmbench::fill(table);
      slot = std::make_unique<pkm::MemoryLayer<float, T>>(c, std::move(table), 11);
    }
    return *slot;
  }
  std::map<std::pair<int, double>, double> warm_bandwidth;
  double bandwidth_at(int threads) {
    auto it = bandwidth.find(threads);
    if (it == bandwidth.end()) it = bandwidth.emplace(threads, stream_read_bandwidth()).first;
    return it->second;
  }
  double warm_bandwidth_at(int threads, double bytes) {
    const auto key = std::make_pair(threads, bytes);
    auto it = warm_bandwidth.find(key);
    if (it == warm_bandwidth.end())
      it = warm_bandwidth.emplace(key, warm_read_bandwidth(bytes)).first;
    return it->second;
  }
};

/// One forward of `batch` tokens per iteration, with `threads` OpenMP threads; a table row
/// is `row_bytes` bytes.
template <class Layer>
void decode_latency_of(benchmark::State& state, DecodeFixture& fixture, const Layer& layer,
                       double row_bytes, Index batch, int threads) {
  const int saved_threads = omp_get_max_threads();
  omp_set_num_threads(threads);
  const auto c = quickstart_shape();
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
  // A layer with bf16 products (or bf16 half scores) reads its weights' (or sub-keys') packed
  // bf16 copies (pkm/packed_weights.hpp): 2 bytes each.
  const auto packed = pkm::packed_weights(layer.params());
  auto packed_bf16 = [&](pkm::Tensor t) {
    return packed && (packed->of(t) || (t == pkm::Tensor::keys && !packed->key_halves.empty()));
  };
  double dense_bytes = 0;
  layer.params().for_each([&](pkm::Tensor t, pkm::ConstMatrixMap<float> m) {
    dense_bytes += double(m.size()) * (packed_bf16(t) ? 2 : 4);
  });
  const double row_total = double(batch * c.bag_size()) * row_bytes;  // at most these
  const double bytes = dense_bytes + row_total;
  const double bandwidth = fixture.bandwidth_at(threads);
  const double warm_limit =
      (dense_bytes / fixture.warm_bandwidth_at(threads, dense_bytes) + row_total / bandwidth) * 1e6;

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
  state.counters["warm_limit_us"] = warm_limit;
  state.counters["p50_per_warm_limit"] = p50 / warm_limit;
  state.counters["MiB_read"] = bytes / (1 << 20);
  state.counters["calls"] = double(us.size());
  state.SetItemsProcessed(std::int64_t(state.iterations()) * batch);
  omp_set_num_threads(saved_threads);
}

template <class T>
void decode_latency(benchmark::State& state, DecodeFixture& fixture, Index batch, int threads,
                    bool bf16_products = false, bool bf16_scores = false) {
  decode_latency_of(state, fixture, fixture.layer<T>(bf16_products, bf16_scores),
                    double(quickstart_shape().v_dim) * sizeof(T), batch, threads);
}

}  // namespace

/// Registers BM_DecodeLatency<float|bf16|float_bf16_products|float_bf16_scores|int8|int4|fp8>/
/// batch:{1,8,64}/threads:{1,2} (called by main): an fp32 table, a bf16 table, the fp32 table's
/// layer computing its products in bf16 (MemoryConfig::compute), the same with its key scores
/// in bf16 too (MemoryConfig::score_compute: the sub-keys packed on every call), and the fp32
/// layer served from its table quantized (docs/quantization.md).
void register_decode_benchmarks() {
  auto fixture = std::make_shared<DecodeFixture>();
  for (const char* type :
       {"float", "bf16", "float_bf16_products", "float_bf16_scores", "int8", "int4", "fp8"}) {
    for (int threads : {1, 2}) {
      for (Index batch : {1, 8, 64}) {
        const std::string name = std::string("BM_DecodeLatency<") + type +
                                 ">/batch:" + std::to_string(batch) +
                                 "/threads:" + std::to_string(threads);
        const bool bf16_table = std::string(type) == "bf16";
        const bool bf16_scores = std::string(type) == "float_bf16_scores";
        const bool bf16_products = bf16_scores || std::string(type) == "float_bf16_products";
        const auto format = pkm::parse_quantized_dtype(type);
        benchmark::RegisterBenchmark(
            name.c_str(),
            [fixture, bf16_table, bf16_products, bf16_scores, format, batch,
             threads](benchmark::State& st) {
              if (format) {
                const auto& layer = fixture->quantized_layer(*format);
                decode_latency_of(st, *fixture, layer, double(layer.values().row_bytes()), batch,
                                  threads);
              } else if (bf16_table) {
                decode_latency<pkm::bf16>(st, *fixture, batch, threads);
              } else {
                decode_latency<float>(st, *fixture, batch, threads, bf16_products, bf16_scores);
              }
            })
            ->Unit(benchmark::kMicrosecond)
            ->UseRealTime();
      }
    }
  }
}
