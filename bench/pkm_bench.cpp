// pkm_bench: pkm's kernels against the naive embedding-bag, with the machine's streaming-read
// limit measured in the same run. Reproduce with: pkm_bench --benchmark_format=json
#include <benchmark/benchmark.h>

#include <pkm/embedding_bag_ref.hpp>
#include <pkm/pkm.hpp>

#include "common.hpp"

#include <dlfcn.h>
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using pkm::Index;
using MatF = pkm::RowMatrix<float>;

constexpr Index kBagHeads = 4, kBagKnn = 32, kBag = kBagHeads * kBagKnn;
constexpr std::size_t kTableBytes = std::size_t{1} << 30;  // 1 GiB: far beyond any cache

pkm::IndexMatrix random_indices(Index B, Index L, Index rows, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<Index> u(0, rows - 1);
  pkm::IndexMatrix idx(B, L);
  for (Index i = 0; i < idx.size(); ++i) idx.data()[i] = u(rng);
  return idx;
}

using pkmbench::fill;

MatF softmax_like_weights(Index B, Index L) {
  MatF w = MatF::Constant(B, L, 1.0f / float(kBagKnn));
  return w;
}

/// The machine's limit: a plain streaming read (sum) of a buffer far larger than L3, split
/// over the threads, each summing its part with Eigen's vectorised reduction (several
/// independent accumulators, so the adds never wait on each other).
void BM_StreamRead(benchmark::State& state) {
  const Index n = Index(kTableBytes / sizeof(float));
  pkm::ValueTable<float> buf(n / 1024, 1024);
  fill(buf);
  for (auto _ : state) benchmark::DoNotOptimize(pkmbench::stream_sum(buf.data(), n));
  state.SetBytesProcessed(std::int64_t(state.iterations()) *
                          std::int64_t(n * Index(sizeof(float))));
}
BENCHMARK(BM_StreamRead)->Unit(benchmark::kMillisecond)->UseRealTime();

/// The naive embedding bag (row by row, scalar, no prefetch) or pkm's, over a 1 GiB table of
/// T: 4096 tokens, each a bag of 4 heads x 32 rows.
template <class T, bool kNaive>
void gather(benchmark::State& state) {
  const Index dim = state.range(0), batch = 4096;
  const Index rows = Index(kTableBytes / (sizeof(T) * dim));
  pkm::ValueTable<T> table(rows, dim);
  fill(table);
  const auto idx = random_indices(batch, kBag, rows, 3);
  const MatF w = softmax_like_weights(batch, kBag);
  MatF out(batch, dim);
  for (auto _ : state) {
    if (kNaive) {
      pkm::embedding_bag_naive(table, idx, w, out);
    } else {
      pkm::embedding_bag(table, idx, w, out);
    }
    benchmark::DoNotOptimize(out.data());
  }
  const double rows_read = double(state.iterations()) * double(batch * kBag);
  state.SetBytesProcessed(std::int64_t(rows_read * double(dim * Index(sizeof(T)))));
  state.counters["rows/s"] = benchmark::Counter(rows_read, benchmark::Counter::kIsRate);
}

template <class T>
void register_gathers(const char* dtype) {
  for (Index dim : {256, 1024, 4096}) {
    benchmark::RegisterBenchmark((std::string("BM_EmbeddingBag/") + dtype).c_str(),
                                 gather<T, false>)
        ->Arg(dim)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }
}

/// A quantized table of the rows BM_EmbeddingBag/fp32's 1 GiB table has at this dim, its
/// codes and scales made up (valid rows; the read's speed does not depend on the values).
pkm::QuantizedTable bench_quantized_table(pkm::Dtype format, Index rows, Index dim) {
  pkm::QuantizedTable t(format, rows, dim);
  const Index vb = format == pkm::Dtype::int4_rowwise ? (dim + 1) / 2 : dim;
#pragma omp parallel for schedule(static)
  for (Index r = 0; r < rows; ++r) {
    std::uint8_t* row = t.row(r);
    for (Index d = 0; d < vb; ++d) row[d] = std::uint8_t((r * 31 + d) % 97);  // fp8: no NaN code
    if (format == pkm::Dtype::int4_rowwise) {
      pkm::detail::store_f16(row + vb, 1e-3f);
      pkm::detail::store_f16(row + vb + 2, -0.01f);
    } else {
      pkm::detail::store_f32(row + vb, 1e-3f);
      if (format == pkm::Dtype::int8_rowwise) pkm::detail::store_f32(row + vb + 4, -0.01f);
    }
  }
  return t;
}

/// pkm's read over the same rows as BM_EmbeddingBag/fp32 (4096 tokens x 4 heads x 32 rows),
/// stored quantized: rows/s against the fp32 read's, bytes/s (the rows' bytes with their
/// scales) against BM_StreamRead's.
void quantized_gather(benchmark::State& state, pkm::Dtype format) {
  const Index dim = state.range(0), batch = 4096;
  const Index rows = Index(kTableBytes / (sizeof(float) * dim));
  const pkm::QuantizedTable table = bench_quantized_table(format, rows, dim);
  const auto idx = random_indices(batch, kBag, rows, 3);
  const MatF w = softmax_like_weights(batch, kBag);
  MatF out(batch, dim);
  for (auto _ : state) {
    pkm::embedding_bag(table, idx, w, out);
    benchmark::DoNotOptimize(out.data());
  }
  const double rows_read = double(state.iterations()) * double(batch * kBag);
  state.SetBytesProcessed(std::int64_t(rows_read * double(table.row_bytes())));
  state.counters["rows/s"] = benchmark::Counter(rows_read, benchmark::Counter::kIsRate);
}

void register_quantized_gathers() {
  for (pkm::Dtype f : pkm::kQuantizedDtypes) {
    const std::string name = std::string("BM_EmbeddingBag/") +
                             (f == pkm::Dtype::int8_rowwise   ? "int8"
                              : f == pkm::Dtype::int4_rowwise ? "int4"
                                                              : "fp8");
    for (Index dim : {256, 1024, 4096}) {
      benchmark::RegisterBenchmark(name.c_str(),
                                   [f](benchmark::State& st) { quantized_gather(st, f); })
          ->Arg(dim)
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
    }
  }
}

/// The quickstart layer's forward (BM_LayerForward's batch) with its table quantized: tokens/s
/// and the table's bytes, against BM_LayerForward's fp32 table.
void quantized_layer_forward(benchmark::State& state, pkm::Dtype format) {
  const auto c = pkmbench::quickstart_shape();
  const Index batch = 2048;
  pkm::MemoryLayer<float> full(c, 7);
  const pkm::MemoryLayer<float, pkm::Quantized> layer(full.params(),
                                                      pkm::quantize(full.values(), format));
  full.values() = pkm::ValueTable<float>(1, 1);  // free the fp32 table: only the quantized one
  MatF x(batch, c.input_dim);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = float(std::sin(0.37 * double(i)));
  pkm::ForwardCache<float> cache;
  MatF y(batch, c.output_dim);
  layer.forward(x, y, cache);  // untimed, as layer_bench's
  for (auto _ : state) {
    layer.forward(x, y, cache);
    benchmark::DoNotOptimize(y.data());
  }
  state.SetItemsProcessed(std::int64_t(state.iterations()) * batch);
  state.counters["table_MiB"] = double(layer.values().bytes()) / double(1 << 20);
}

void register_quantized_layers() {
  for (pkm::Dtype f : pkm::kQuantizedDtypes) {
    const std::string name = std::string("BM_LayerForwardQuantized/") + pkm::dtype_name(f);
    benchmark::RegisterBenchmark(name.c_str(),
                                 [f](benchmark::State& st) { quantized_layer_forward(st, f); })
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }
}

void BM_EmbeddingBagNaive(benchmark::State& state) { gather<float, true>(state); }
BENCHMARK(BM_EmbeddingBagNaive)
    ->Arg(256)
    ->Arg(1024)
    ->Arg(4096)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// ---- GEMM: the best library GEMM (the limit) and pkm's products ------------------------------

/// One product C (m x n) = A (m x k) * B^T (B stored n x k), as the layer's linear maps do.
struct GemmShape {
  Index m, n, k;
  double flop() const { return 2.0 * double(m) * double(n) * double(k); }
};

/// The forward's products at BM_LayerForward's shapes (2048 tokens): the query (1024 -> 2048),
/// W1 and W2 (1024 -> 1024), and the 8 half-score products (4 heads x 2 halves, 256 -> 512).
std::vector<GemmShape> layer_forward_gemms() {
  std::vector<GemmShape> v = {{2048, 2048, 1024}, {2048, 1024, 1024}, {2048, 1024, 1024}};
  for (int i = 0; i < 8; ++i) v.push_back({2048, 512, 256});
  return v;
}
/// The layer's largest product: the query projection of 2048 tokens, 1024 -> 2048.
std::vector<GemmShape> largest_gemm() { return {{2048, 2048, 1024}}; }

using GemmFn = void (*)(const GemmShape&, const float*, const float*, float*);

void gemm_pkm(const GemmShape& s, const float* a, const float* b, float* c) {
  pkm::gemm<float>(false, true, s.m, s.n, s.k, 1.0f, a, s.k, b, s.k, 0.0f, c, s.n);
}
/// pkm::gemm on a named backend (the alternatives to the one gemm_backend() picks).
template <pkm::GemmBackend kBackend>
void gemm_pkm_on(const GemmShape& s, const float* a, const float* b, float* c) {
  pkm::gemm<float>(false, true, s.m, s.n, s.k, 1.0f, a, s.k, b, s.k, 0.0f, c, s.n, kBackend);
}
/// The same product with bf16 operands rounded while packed (pkm/gemm_bf16.hpp): float in,
/// float out, as torch.autocast's matmul of float tensors.
void gemm_pkm_bf16(const GemmShape& s, const float* a, const float* b, float* c) {
  pkm::gemm_bf16(false, true, s.m, s.n, s.k, 1.0f, a, s.k, b, s.k, 0.0f, c, s.n);
}

/// Eigen's own (OpenMP-threaded) product of whole matrices: a library GEMM, outside pkm.
void gemm_eigen_threaded(const GemmShape& s, const float* a, const float* b, float* c) {
  pkm::MatrixMap<float>(c, s.m, s.n).noalias() =
      pkm::ConstMatrixMap<float>(a, s.m, s.k) * pkm::ConstMatrixMap<float>(b, s.n, s.k).transpose();
}

#if defined(PKM_WITH_BLIS)
/// BLIS called directly (its kernel for this CPU as BLIS detects it), all threads.
void gemm_blis(const GemmShape& s, const float* a, const float* b, float* c) {
  rntm_t rntm = BLIS_RNTM_INITIALIZER;
  bli_rntm_set_num_threads(omp_get_max_threads(), &rntm);
  float one = 1.0f, zero = 0.0f;
  bli_sgemm_ex(BLIS_NO_TRANSPOSE, BLIS_TRANSPOSE, s.m, s.n, s.k, &one, const_cast<float*>(a), s.k,
               1, const_cast<float*>(b), s.k, 1, &zero, c, s.n, 1, nullptr, &rntm);
}
#endif

/// OpenBLAS, loaded at run time (so it can sit beside BLIS in one process) where installed.
using CblasSgemm = void (*)(int, int, int, int, int, int, float, const float*, int, const float*,
                            int, float, float*, int);
CblasSgemm openblas_sgemm() {
  static CblasSgemm fn = [] {
    for (const char* lib : {"libopenblas.so.0", "libopenblas.so"}) {
      if (void* h = dlopen(lib, RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND)) {
        if (auto set = reinterpret_cast<void (*)(int)>(dlsym(h, "openblas_set_num_threads")))
          set(omp_get_max_threads());
        return reinterpret_cast<CblasSgemm>(dlsym(h, "cblas_sgemm"));
      }
    }
    return CblasSgemm(nullptr);
  }();
  return fn;
}
void gemm_openblas(const GemmShape& s, const float* a, const float* b, float* c) {
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  openblas_sgemm()(kRowMajor, kNoTrans, kTrans, int(s.m), int(s.n), int(s.k), 1.0f, a, int(s.k), b,
                   int(s.k), 0.0f, c, int(s.n));
}

/// Runs `fn` over every product of `shapes` per iteration; reports FLOP/s.
void gemm_bench(benchmark::State& state, std::vector<GemmShape> shapes, GemmFn fn) {
  if (fn == gemm_openblas && openblas_sgemm() == nullptr) {
    state.SkipWithError("OpenBLAS not installed (Debian: libopenblas0-pthread)");
    return;
  }
  std::vector<MatF> a, b, c;
  double flop = 0;
  for (const auto& s : shapes) {
    a.push_back(MatF::Constant(s.m, s.k, 0.01f));
    b.push_back(MatF::Constant(s.n, s.k, 0.02f));
    c.push_back(MatF::Zero(s.m, s.n));  // touched before timing: no page faults in the loop
    flop += s.flop();
  }
  for (auto _ : state) {
    for (std::size_t i = 0; i < shapes.size(); ++i)
      fn(shapes[i], a[i].data(), b[i].data(), c[i].data());
    benchmark::DoNotOptimize(c.back().data());
  }
  state.counters["FLOP/s"] =
      benchmark::Counter(flop * double(state.iterations()), benchmark::Counter::kIsRate);
}

/// BM_Gemm/<library>: the limit, the layer's largest product by each library called directly;
/// BM_LayerGemm/<library>: the forward's 11 products; BM_LayerGemm/pkm: the same through
/// pkm::gemm (the backend pkm_bench prints at start).
void register_gemms() {
  std::vector<std::pair<const char*, GemmFn>> libs = {{"eigen_threaded", gemm_eigen_threaded},
                                                      {"openblas", gemm_openblas}};
#if defined(PKM_WITH_BLIS)
  libs.insert(libs.begin(), {"blis", gemm_blis});
#endif
  for (const auto& [name, fn] : libs) {
    benchmark::RegisterBenchmark((std::string("BM_Gemm/") + name).c_str(), gemm_bench,
                                 largest_gemm(), fn)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }
  benchmark::RegisterBenchmark("BM_Gemm/pkm", gemm_bench, largest_gemm(), gemm_pkm)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
  // The deterministic backends compiled in, each forced: the alternatives gemm_backend()
  // chose among.
  benchmark::RegisterBenchmark("BM_Gemm/pkm_eigen", gemm_bench, largest_gemm(),
                               gemm_pkm_on<pkm::GemmBackend::eigen>)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
#if defined(PKM_WITH_BLIS)
  benchmark::RegisterBenchmark("BM_Gemm/pkm_blis", gemm_bench, largest_gemm(),
                               gemm_pkm_on<pkm::GemmBackend::blis>)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
#endif
  // Its peer is torch.matmul of bf16 tensors (bench/compare_pytorch.py).
  benchmark::RegisterBenchmark("BM_Gemm/pkm_bf16", gemm_bench, largest_gemm(), gemm_pkm_bf16)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
  for (const auto& [name, fn] : libs) {
    benchmark::RegisterBenchmark((std::string("BM_LayerGemm/") + name).c_str(), gemm_bench,
                                 layer_forward_gemms(), fn)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }
  benchmark::RegisterBenchmark("BM_LayerGemm/pkm", gemm_bench, layer_forward_gemms(), gemm_pkm)
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
}

/// Naive value backward: a dense zero-filled gradient table plus a scatter-add (what a dense
/// EmbeddingBag backward does), against pkm's sparse backward. 1024^2 slots x 1024, batch 2048.
template <bool kNaive>
void value_grad(benchmark::State& state) {
  const Index rows = Index(1) << 20, dim = 1024, batch = 2048;
  pkm::ValueTable<float> table(kNaive ? 1 : rows, dim);  // only pkm's backward reads rows
  const auto idx = random_indices(batch, kBag, rows, 4);
  const MatF w = softmax_like_weights(batch, kBag);
  const MatF dy = MatF::Constant(batch, dim, 1e-3f);
  MatF dw(batch, kBag);
  std::vector<float> dense;
  for (auto _ : state) {
    if (kNaive) {
      dense.assign(std::size_t(rows * dim), 0.0f);
      for (Index b = 0; b < batch; ++b)
        for (Index l = 0; l < kBag; ++l) {
          float* g = dense.data() + idx(b, l) * dim;
          for (Index d = 0; d < dim; ++d) g[d] += w(b, l) * dy(b, d);
        }
      benchmark::DoNotOptimize(dense.data());
    } else {
      pkm::SparseRowGrad<float> g;
      pkm::embedding_bag_backward(table, idx, w, dy, dw, g);
      benchmark::DoNotOptimize(g.values.data());
    }
  }
  state.SetItemsProcessed(std::int64_t(state.iterations()) * batch);
}
void BM_ValueGradNaive(benchmark::State& state) { value_grad<true>(state); }
void BM_ValueGrad(benchmark::State& state) { value_grad<false>(state); }
BENCHMARK(BM_ValueGradNaive)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_ValueGrad)->Unit(benchmark::kMillisecond)->UseRealTime();

/// The value-table update of one training step (lazy Adam or row-wise Adagrad) at 2^20
/// slots x 256 (1 GiB fp32), batch 2048 x 128 reads (about 23% of the rows touched):
/// naive = a dense gradient table (zero-fill + scatter) and a dense Adam over every row (what
/// a framework without sparse gradients does); step = pkm's sparse backward, then
/// optimizer.step(); fused = embedding_bag_backward_update (no gradient rows stored).
/// Bytes counted: the rows the optimizer reads and writes (table + state) for touched rows.
enum class UpdateMode { naive, step, fused };
template <class Opt, UpdateMode kMode>
void value_update(benchmark::State& state) {
  const Index rows = Index(1) << 20, dim = 256, batch = 2048;
  pkm::ValueTable<float> table(rows, dim);
  fill(table);
  const auto idx = random_indices(batch, kBag, rows, 6);
  const MatF w = softmax_like_weights(batch, kBag);
  const MatF dy = MatF::Constant(batch, dim, 1e-3f);
  MatF dw(batch, kBag);
  std::optional<Opt> opt;  // the naive version has no sparse optimizer (and no 2 GiB of its state)
  if (kMode != UpdateMode::naive) opt.emplace(table);
  std::vector<float> dense_grad;
  pkm::optim::AdamW<float> dense_adam;
  if (kMode == UpdateMode::naive) {
    dense_grad.assign(std::size_t(rows * dim), 0.0f);
    dense_adam.add("values", table.data(), dense_grad.data(), rows * dim);
  }
  std::vector<char> seen(std::size_t(rows), 0);
  Index touched = 0;
  for (Index i = 0; i < idx.size(); ++i) touched += seen[std::size_t(idx.data()[i])]++ == 0;
  for (auto _ : state) {
    if (kMode == UpdateMode::naive) {
      std::fill(dense_grad.begin(), dense_grad.end(), 0.0f);
      for (Index b = 0; b < batch; ++b)
        for (Index l = 0; l < kBag; ++l) {
          float* g = dense_grad.data() + idx(b, l) * dim;
          for (Index d = 0; d < dim; ++d) g[d] += w(b, l) * dy(b, d);
        }
      dense_adam.step();
    } else if (kMode == UpdateMode::step) {
      pkm::SparseRowGrad<float> g;
      pkm::embedding_bag_backward(table, idx, w, dy, dw, g);
      opt->step(table, g);
    } else {
      pkm::embedding_bag_backward_update(table, idx, w, dy, dw, *opt);
    }
    benchmark::DoNotOptimize(table.data());
  }
  const bool adam = kMode == UpdateMode::naive || std::is_same_v<Opt, pkm::optim::LazyAdam<float>>;
  const std::int64_t per_row = std::int64_t(dim * Index(sizeof(float))) * (adam ? 6 : 2);
  state.SetBytesProcessed(std::int64_t(state.iterations()) * touched * per_row);
  state.SetItemsProcessed(std::int64_t(state.iterations()) * batch);
  state.counters["rows_touched"] = double(touched);
}
using LazyAdamF = pkm::optim::LazyAdam<float>;
using AdagradF = pkm::optim::RowWiseAdagrad<float>;
BENCHMARK_TEMPLATE(value_update, LazyAdamF, UpdateMode::naive)
    ->Name("BM_ValueUpdateNaive/dense_adam")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_TEMPLATE(value_update, LazyAdamF, UpdateMode::step)
    ->Name("BM_ValueUpdate/lazy_adam/step")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_TEMPLATE(value_update, LazyAdamF, UpdateMode::fused)
    ->Name("BM_ValueUpdate/lazy_adam/fused")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_TEMPLATE(value_update, AdagradF, UpdateMode::step)
    ->Name("BM_ValueUpdate/rowwise_adagrad/step")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_TEMPLATE(value_update, AdagradF, UpdateMode::fused)
    ->Name("BM_ValueUpdate/rowwise_adagrad/fused")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

using pkmbench::quickstart_shape;

void BM_ProductKeyTopK(benchmark::State& state) {
  const Index n = 512, k = 32, calls = 2048 * 4;
  std::mt19937_64 rng(5);
  std::normal_distribution<float> g;
  std::vector<float> s(std::size_t(2 * n * 64));
  for (auto& v : s) v = g(rng);
  std::vector<std::int64_t> slots(k);
  std::vector<float> scores(k);
  pkm::ProductKeyScratch<float> scratch;
  for (auto _ : state) {
    for (Index c = 0; c < calls; ++c) {
      const float* base = s.data() + (c % 64) * 2 * n;
      pkm::product_key_topk(base, base + n, n, k, slots.data(), scores.data(), scratch);
    }
    benchmark::DoNotOptimize(slots.data());
  }
  state.SetItemsProcessed(std::int64_t(state.iterations()) * calls);
}
BENCHMARK(BM_ProductKeyTopK)->Unit(benchmark::kMillisecond)->UseRealTime();

template <bool kBackward, pkm::Dtype kCompute = pkm::Dtype::f32,
          pkm::Dtype kScores = pkm::Dtype::f32>
void layer_bench(benchmark::State& state) {
  auto c = quickstart_shape();
  c.compute = kCompute;
  c.score_compute = kScores;
  const Index batch = 2048;
  pkm::MemoryLayer<float> layer(c, 7);
  MatF x(batch, c.input_dim), dout = MatF::Constant(batch, c.output_dim, 1e-3f),
                              dx(batch, c.input_dim);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = float(std::sin(0.37 * double(i)));
  pkm::ForwardCache<float> cache;
  MatF y(batch, c.output_dim);
  pkm::LayerGradients<float> grads(c);
  // One untimed step first, as compare_pytorch.py gives PyTorch: a forward + backward takes
  // longer than --benchmark_min_time, so the timed loop may run once, and a cold first step
  // (the caches' and gradients' first allocation and page faults) took 2.6x a warm one.
  layer.forward(x, y, cache);
  if (kBackward) layer.backward(x, cache, dout, grads, dx);
  for (auto _ : state) {
    layer.forward(x, y, cache);
    if (kBackward) {
      grads.zero();
      layer.backward(x, cache, dout, grads, dx);
    }
    benchmark::DoNotOptimize(y.data());
  }
  state.SetItemsProcessed(std::int64_t(state.iterations()) * batch);
}
void BM_LayerForward(benchmark::State& state) { layer_bench<false>(state); }
void BM_LayerForwardBackward(benchmark::State& state) { layer_bench<true>(state); }
BENCHMARK(BM_LayerForward)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_LayerForwardBackward)->Unit(benchmark::kMillisecond)->UseRealTime();
/// The same layer with its products in bf16 (MemoryConfig::compute = Dtype::bf16); the peer
/// is the reference under torch.autocast("cpu", dtype=torch.bfloat16).
void BM_LayerForwardBf16(benchmark::State& state) { layer_bench<false, pkm::Dtype::bf16>(state); }
void BM_LayerForwardBackwardBf16(benchmark::State& state) {
  layer_bench<true, pkm::Dtype::bf16>(state);
}
BENCHMARK(BM_LayerForwardBf16)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_LayerForwardBackwardBf16)->Unit(benchmark::kMillisecond)->UseRealTime();
/// bf16 products and bf16 key scores (MemoryConfig::score_compute = Dtype::bf16): every
/// product in bf16, as under autocast.
void BM_LayerForwardBf16Scores(benchmark::State& state) {
  layer_bench<false, pkm::Dtype::bf16, pkm::Dtype::bf16>(state);
}
void BM_LayerForwardBackwardBf16Scores(benchmark::State& state) {
  layer_bench<true, pkm::Dtype::bf16, pkm::Dtype::bf16>(state);
}
BENCHMARK(BM_LayerForwardBf16Scores)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_LayerForwardBackwardBf16Scores)->Unit(benchmark::kMillisecond)->UseRealTime();

/// Slot statistics left on in training: one add() of BM_LayerForward's cache (2048 tokens x
/// 128 reads into 512^2 slots), counts only (0) or with the softmax mass (1). Compare its
/// time with BM_LayerForward's.
void BM_SlotStatisticsAdd(benchmark::State& state) {
  const auto c = quickstart_shape();
  const Index batch = 2048;
  pkm::MemoryLayer<float> layer(c, 7);
  MatF x(batch, c.input_dim), y(batch, c.output_dim);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = float(std::sin(0.37 * double(i)));
  pkm::ForwardCache<float> cache;
  layer.forward(x, y, cache);
  pkm::SlotStatistics stats(c.slots(), state.range(0) != 0);
  for (auto _ : state) {
    stats.add(cache);
    benchmark::DoNotOptimize(stats.counts().data());
  }
  state.SetItemsProcessed(std::int64_t(state.iterations()) * batch);
}
BENCHMARK(BM_SlotStatisticsAdd)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

void register_decode_benchmarks();  // latency.cpp

int main(int argc, char** argv) {
  std::string alternatives;
  for (pkm::GemmBackend g :
       {pkm::GemmBackend::eigen, pkm::GemmBackend::blis, pkm::GemmBackend::openblas}) {
    if (pkm::gemm_backend_available(g) && g != pkm::gemm_backend())
      alternatives += std::string(alternatives.empty() ? "" : ", ") + pkm::gemm_backend_name(g);
  }
  std::fprintf(stderr,
               "pkm_bench: %d OpenMP threads, GEMM backend %s (compiled in too: %s; "
               "PKM_GEMM_BACKEND overrides; BM_Gemm/pkm_<backend> times each), bf16 kernel %s, "
               "quantized read kernel %s\n",
               omp_get_max_threads(), pkm::gemm_backend_name(pkm::gemm_backend()),
               alternatives.empty() ? "none" : alternatives.c_str(),
               pkm::bf16_kernel_name(pkm::bf16_kernel()), pkm::quant_kernel_name(pkm::quant_kernel()));
  register_gemms();
  register_gathers<float>("fp32");
  register_gathers<pkm::bf16>("bf16");
  register_gathers<pkm::fp16>("fp16");
  register_quantized_gathers();
  register_quantized_layers();
  register_decode_benchmarks();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
