// bench_cuda: pkm's CUDA gather (pkm/cuda/embedding_bag.cuh) against a naive kernel (one
// thread per output element, rows read one at a time) and against the limit measured in the
// same run: a device-to-device copy. fp32 and bf16 tables of >= 4 GiB, v_dim 256-4096, a bag
// of 4 heads x 32, uniformly random slots. Forward and deterministic backward.
//
//   bench_cuda [summary.json]
//
// Prints a markdown table; writes the numbers as JSON when a path is given. Without a CUDA
// device it says so and exits 77.
#include <pkm/cuda/embedding_bag.cuh>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

namespace {

#define CUDA_OK(call)                                                                     \
  do {                                                                                    \
    const cudaError_t e_ = (call);                                                        \
    if (e_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "bench_cuda: %s failed: %s\n", #call, cudaGetErrorString(e_)); \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

/// The naive gather: thread (t, d) sums w[t, j] * table[idx[t, j], d] over the bag.
template <class T>
__global__ void naive_gather(const T* table, std::int64_t stride, const std::int64_t* idx,
                             const float* w, std::int64_t tokens, int bag, std::int64_t dim,
                             float* out) {
  const std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= tokens * dim) return;
  const std::int64_t t = i / dim, d = i % dim;
  float acc = 0.0f;
  for (int j = 0; j < bag; ++j)
    acc += w[t * bag + j] * pkm::cuda::detail::to_float(table[idx[t * bag + j] * stride + d]);
  out[i] = acc;
}

/// Median milliseconds of `reps` runs of fn (after 2 warm-ups), timed with events.
template <class Fn>
float median_ms(int reps, Fn&& fn) {
  cudaEvent_t a, b;
  CUDA_OK(cudaEventCreate(&a));
  CUDA_OK(cudaEventCreate(&b));
  for (int i = 0; i < 2; ++i) fn();
  std::vector<float> ms;
  for (int i = 0; i < reps; ++i) {
    CUDA_OK(cudaEventRecord(a));
    fn();
    CUDA_OK(cudaEventRecord(b));
    CUDA_OK(cudaEventSynchronize(b));
    float m = 0;
    CUDA_OK(cudaEventElapsedTime(&m, a, b));
    ms.push_back(m);
  }
  std::sort(ms.begin(), ms.end());
  CUDA_OK(cudaEventDestroy(a));
  CUDA_OK(cudaEventDestroy(b));
  return ms[ms.size() / 2];
}

/// fn(args, workspace, &bytes, stream, &why), pkm::cuda's calling convention; exits with the
/// message on any status but ok.
template <class Fn, class Args>
void call_or_exit(Fn fn, const Args& a, void* workspace, std::size_t* bytes) {
  std::string why;
  if (fn(a, workspace, bytes, nullptr, &why) != pkm::cuda::Status::ok) {
    std::fprintf(stderr, "bench_cuda: %s\n", why.c_str());
    std::exit(1);
  }
}
/// The workspace the call needs (its size query), allocated once.
template <class Fn, class Args>
void* workspace_for(Fn fn, const Args& a, std::size_t* bytes) {
  call_or_exit(fn, a, nullptr, bytes);
  void* p = nullptr;
  CUDA_OK(cudaMalloc(&p, *bytes));
  return p;
}

struct Row {
  std::string dtype;
  std::int64_t dim = 0, rows = 0, tokens = 0;
  double naive_gbs = 0, pkm_gbs = 0, backward_gbs = 0;
};

}  // namespace

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("bench_cuda: skipped, no usable CUDA device\n");
    return 77;
  }
  cudaDeviceProp prop{};
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  const std::size_t table_bytes = std::size_t(4) << 30;  // 4 GiB
  void* table = nullptr;
  CUDA_OK(cudaMalloc(&table, table_bytes));
  CUDA_OK(cudaMemset(table, 0x3c, table_bytes));  // small finite values in fp32, bf16 and fp16
  // The limit: a device-to-device copy of 1 GiB, bytes read + written.
  const std::size_t copy_bytes = std::size_t(1) << 30;
  void* copy_dst = nullptr;
  CUDA_OK(cudaMalloc(&copy_dst, copy_bytes));
  const float copy_ms = median_ms(
      20, [&] { CUDA_OK(cudaMemcpyAsync(copy_dst, table, copy_bytes, cudaMemcpyDeviceToDevice)); });
  const double copy_gbs = 2.0 * double(copy_bytes) / (copy_ms * 1e-3) / 1e9;
  std::printf("device: %s, %d SMs; device-to-device copy %.0f GB/s (read + written)\n\n", prop.name,
              prop.multiProcessorCount, copy_gbs);

  const int heads = 4, knn = 32, bag = heads * knn;
  std::vector<Row> rows_out;
  std::printf(
      "| table | v_dim | rows | tokens | naive GB/s | pkm GB/s | pkm / copy | pkm / naive | "
      "backward GB/s | backward / copy |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (pkm::Dtype dtype : {pkm::Dtype::f32, pkm::Dtype::bf16}) {
    for (std::int64_t dim : {256, 1024, 4096}) {
      const int esize = pkm::cuda::dtype_bytes(dtype);
      const std::int64_t rows = std::int64_t(table_bytes / std::size_t(dim * esize));
      const std::int64_t tokens = std::max<std::int64_t>(
          1024, (std::int64_t(2) << 30) / (bag * dim * esize));  // ~2 GB of rows per call
      const std::int64_t n = tokens * bag;
      std::vector<std::int64_t> idx(static_cast<std::size_t>(n));
      std::vector<float> w(static_cast<std::size_t>(n), 1.0f / float(bag));
      std::mt19937_64 rng{static_cast<std::uint64_t>(dim)};
      for (auto& v : idx) v = std::int64_t(rng() % std::uint64_t(rows));
      std::int64_t *d_idx = nullptr, *d_unique = nullptr, *d_count = nullptr;
      float *d_w = nullptr, *d_out = nullptr, *d_dw = nullptr, *d_rows = nullptr;
      CUDA_OK(cudaMalloc(&d_idx, std::size_t(n) * 8));
      CUDA_OK(cudaMalloc(&d_w, std::size_t(n) * 4));
      CUDA_OK(cudaMalloc(&d_dw, std::size_t(n) * 4));
      CUDA_OK(cudaMalloc(&d_out, std::size_t(tokens * dim) * 4));
      CUDA_OK(cudaMalloc(&d_unique, std::size_t(n) * 8));
      CUDA_OK(cudaMalloc(&d_rows, std::size_t(n) * std::size_t(dim) * 4));
      CUDA_OK(cudaMalloc(&d_count, 8));
      CUDA_OK(cudaMemcpy(d_idx, idx.data(), std::size_t(n) * 8, cudaMemcpyHostToDevice));
      CUDA_OK(cudaMemcpy(d_w, w.data(), std::size_t(n) * 4, cudaMemcpyHostToDevice));
      CUDA_OK(cudaMemset(d_out, 0, std::size_t(tokens * dim) * 4));  // also the backward's dy

      const double read_bytes = double(n) * double(dim) * esize;  // the rows the gather reads
      const auto threads = tokens * dim;
      const unsigned blocks = unsigned((threads + 255) / 256);
      const float naive_ms = median_ms(5, [&] {
        if (dtype == pkm::Dtype::f32) {
          naive_gather<<<blocks, 256>>>(static_cast<const float*>(table), dim, d_idx, d_w, tokens,
                                        bag, dim, d_out);
        } else {
          naive_gather<<<blocks, 256>>>(static_cast<const __nv_bfloat16*>(table), dim, d_idx, d_w,
                                        tokens, bag, dim, d_out);
        }
      });
      CUDA_OK(cudaGetLastError());
      pkm::cuda::ForwardArgs f;
      f.table = {table, dtype, rows, dim, dim};
      f.bag = {d_idx, tokens, heads, knn};
      f.weights = d_w;
      f.out = d_out;
      f.out_stride = dim;
      std::size_t ws = 0;
      void* d_fws = workspace_for(pkm::cuda::embedding_bag_forward, f, &ws);
      const float pkm_ms =
          median_ms(10, [&] { call_or_exit(pkm::cuda::embedding_bag_forward, f, d_fws, &ws); });
      // The deterministic backward, sparse output, with the weights' gradient.
      pkm::cuda::BackwardArgs b;
      b.table = f.table;
      b.bag = f.bag;
      b.weights = d_w;
      b.dy = d_out;
      b.dy_stride = dim;
      b.dweights = d_dw;
      b.unique_slots = d_unique;
      b.grad_rows = d_rows;
      b.num_unique = d_count;
      std::size_t bws = 0;
      void* d_ws = workspace_for(pkm::cuda::embedding_bag_backward, b, &bws);
      const float back_ms =
          median_ms(5, [&] { call_or_exit(pkm::cuda::embedding_bag_backward, b, d_ws, &bws); });
      std::int64_t unique = 0;
      CUDA_OK(cudaMemcpy(&unique, d_count, 8, cudaMemcpyDeviceToHost));
      // Backward traffic: the table rows the weights' gradient reads, dy read once per pair
      // by the value gradient, and the gradient rows written.
      const double back_bytes =
          read_bytes + double(n) * double(dim) * 4 + double(unique) * double(dim) * 4;
      Row r{dtype == pkm::Dtype::f32 ? "fp32" : "bf16",
            dim,
            rows,
            tokens,
            read_bytes / (naive_ms * 1e-3) / 1e9,
            read_bytes / (pkm_ms * 1e-3) / 1e9,
            back_bytes / (back_ms * 1e-3) / 1e9};
      rows_out.push_back(r);
      std::printf("| %s | %lld | %lld | %lld | %.0f | %.0f | %.0f %% | %.1fx | %.0f | %.0f %% |\n",
                  r.dtype.c_str(), (long long)dim, (long long)rows, (long long)tokens, r.naive_gbs,
                  r.pkm_gbs, 100 * r.pkm_gbs / copy_gbs, r.pkm_gbs / r.naive_gbs, r.backward_gbs,
                  100 * r.backward_gbs / copy_gbs);
      for (void* p : {static_cast<void*>(d_idx), static_cast<void*>(d_w), static_cast<void*>(d_dw),
                      static_cast<void*>(d_out), static_cast<void*>(d_unique),
                      static_cast<void*>(d_rows), static_cast<void*>(d_count), d_ws, d_fws}) {
        CUDA_OK(cudaFree(p));
      }
    }
  }
  if (argc > 1) {
    std::FILE* j = std::fopen(argv[1], "w");
    if (j == nullptr) {
      std::fprintf(stderr, "bench_cuda: cannot write %s\n", argv[1]);
      return 1;
    }
    std::fprintf(
        j, "{\"device\": \"%s\", \"copy_gbs\": %.1f, \"heads\": %d, \"knn\": %d, \"results\": [",
        prop.name, copy_gbs, heads, knn);
    for (std::size_t i = 0; i < rows_out.size(); ++i) {
      const Row& r = rows_out[i];
      std::fprintf(j,
                   "%s{\"dtype\": \"%s\", \"dim\": %lld, \"rows\": %lld, \"tokens\": %lld, "
                   "\"naive_gbs\": %.1f, "
                   "\"pkm_gbs\": %.1f, \"backward_gbs\": %.1f}",
                   i ? ", " : "", r.dtype.c_str(), (long long)r.dim, (long long)r.rows,
                   (long long)r.tokens, r.naive_gbs, r.pkm_gbs, r.backward_gbs);
    }
    std::fprintf(j, "]}\n");
    std::fclose(j);
  }
  CUDA_OK(cudaFree(table));
  CUDA_OK(cudaFree(copy_dst));
  return 0;
}
