// pkm/cuda/embedding_bag.cuh — the memory layer's read on an NVIDIA GPU: the fused weighted
// gather of value rows (forward, optionally with the per-head softmax fused in) and its
// backward (the value gradient, deterministic by sorting or with atomics, sparse or added into
// a dense gradient; the weights' or scores' gradient in the same call). Target pkm::cuda.
//
// Design (docs/cuda.md): a sub-warp of 4-32 lanes per token; each lane loads one index and
// weight of a chunk of the bag and the sub-warp shares them by shuffle; rows are read as
// 16-byte vectors through the read-only path, four rows in flight; any v_dim and row stride
// (16-byte vectors where rows allow, scalars otherwise); fp32 accumulation for fp32, bf16 and
// fp16 tables. The deterministic value gradient sorts (slot, position) pairs with CUB's radix
// sort on only the bits the slot count needs, run-length encodes them and reduces each slot's
// contributions in ascending position order: the same bits on every run, no atomics.
//
// Raw device pointers, sizes and strides, a cudaStream_t; no allocation: a call with a null
// workspace returns the bytes it needs. Arguments are checked on the host before any launch
// (pkm/cuda/args.hpp); a status, never an out-of-bounds access.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_run_length_encode.cuh>
#include <cub/device/device_scan.cuh>

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "pkm/cuda/args.hpp"
#include "pkm/cuda/layout.hpp"

namespace pkm::cuda {
namespace detail {

constexpr int kBlock = 256;
constexpr unsigned kFull = 0xffffffffu;

__device__ inline float to_float(float v) { return v; }
__device__ inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ inline float to_float(__half v) { return __half2float(v); }

/// The two 16-bit elements of a 32-bit word as floats, the low half first (little-endian).
template <class T>
__device__ inline void unpack2(unsigned w, float& lo, float& hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  } else {
    lo = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
    hi = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
}

/// VEC elements of a row starting at p (16-byte aligned when VEC > 1), as floats.
template <int VEC, class T>
__device__ inline void load_vec(const T* p, float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    v[0] = to_float(__ldg(p));
  } else if constexpr (sizeof(T) == 4) {
    static_assert(VEC == 4, "fp32 vectors are 4 wide");
    const float4 f = __ldg(reinterpret_cast<const float4*>(p));
    v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
  } else {
    static_assert(VEC == 8, "16-bit vectors are 8 wide");
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    unpack2<T>(u.x, v[0], v[1]);  // no array of words: registers only
    unpack2<T>(u.y, v[2], v[3]);
    unpack2<T>(u.z, v[4], v[5]);
    unpack2<T>(u.w, v[6], v[7]);
  }
}

__device__ inline float subwarp_sum(float v, int lanes) {
  for (int o = lanes / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o, lanes);
  return v;
}
__device__ inline float subwarp_max(float v, int lanes) {
  for (int o = lanes / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o, lanes));
  return v;
}

/// Where this thread works: item (token or segment) `item` of a sub-warp of `lanes` threads,
/// as lane `lane` (layout.hpp's arithmetic, from the global thread index).
struct SubwarpPosition {
  std::int64_t item;
  int lane;
};
__device__ inline SubwarpPosition subwarp_position(int lanes) {
  const std::int64_t thread = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  return {token_of(thread, lanes), lane_of(thread, lanes)};
}

/// Softmax over each head's knn scores of token t, written to w_out (a sub-warp per token;
/// every lane of the warp must call it).
__device__ inline void subwarp_softmax(const float* scores, float* w_out, std::int64_t t, bool valid, int heads, int knn,
                                       int lane, int lanes) {
  const std::int64_t base = t * std::int64_t(heads) * knn;
  for (int h = 0; h < heads; ++h) {
    float m = -INFINITY;
    for (int e = lane; e < knn; e += lanes) {
      if (valid) m = fmaxf(m, scores[base + h * knn + e]);
    }
    m = subwarp_max(m, lanes);
    float s = 0.0f;
    for (int e = lane; e < knn; e += lanes) {
      if (valid) s += __expf(scores[base + h * knn + e] - m);
    }
    s = subwarp_sum(s, lanes);
    for (int e = lane; e < knn; e += lanes) {
      if (valid) w_out[base + h * knn + e] = __expf(scores[base + h * knn + e] - m) / s;
    }
  }
}

/// The forward: a sub-warp per token, CHUNKS vectors of VEC columns per lane per pass.
template <class T, int VEC, int CHUNKS>
__global__ void bag_forward_kernel(const T* __restrict__ table, std::int64_t stride,
                                                             const std::int64_t* __restrict__ idx,
                                                             const float* __restrict__ weights, float* w_out,
                                                             bool softmax, std::int64_t tokens, int heads, int knn,
                                                             float* __restrict__ out, std::int64_t out_stride,
                                                             RowLayout layout) {
  const int lanes = layout.lanes;
  const auto [t, lane] = subwarp_position(lanes);
  const bool valid = t < tokens;
  const int bag = heads * knn;
  const float* w = weights;
  if (softmax) {
    subwarp_softmax(weights, w_out, t, valid, heads, knn, lane, lanes);
    __syncwarp();
    w = w_out;
  }
  const std::int64_t iters = layout.iterations();
  for (std::int64_t i0 = 0; i0 < iters; i0 += CHUNKS) {
    float acc[CHUNKS][VEC];
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[c][e] = 0.0f;
    }
    for (int j0 = 0; j0 < bag; j0 += lanes) {
      // One coalesced load of the chunk's indices and weights, shared by shuffle.
      int my_idx = 0;  // table rows < 2^31 (checked on the host): 32-bit shuffles
      float my_w = 0.0f;
      if (valid && j0 + lane < bag) {
        my_idx = static_cast<int>(idx[t * bag + j0 + lane]);
        my_w = w[t * bag + j0 + lane];
      }
      const int n = min(lanes, bag - j0);
      int jj = 0;
      for (; jj + 4 <= n; jj += 4) {  // four rows in flight
        int r[4];
        float wt[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          r[q] = __shfl_sync(kFull, my_idx, jj + q, lanes);
          wt[q] = __shfl_sync(kFull, my_w, jj + q, lanes);
        }
        if (valid) {
#pragma unroll
          for (int c = 0; c < CHUNKS; ++c) {
            const std::int64_t col = layout.column(lane, i0 + c);
            if (col < layout.dim) {
              float v[4][VEC];
#pragma unroll
              for (int q = 0; q < 4; ++q) load_vec<VEC>(table + std::int64_t(r[q]) * stride + col, v[q]);
#pragma unroll
              for (int q = 0; q < 4; ++q) {
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc[c][e] = fmaf(wt[q], v[q][e], acc[c][e]);
              }
            }
          }
        }
      }
      for (; jj < n; ++jj) {
        const std::int64_t r = __shfl_sync(kFull, my_idx, jj, lanes);
        const float wt = __shfl_sync(kFull, my_w, jj, lanes);
        if (valid) {
#pragma unroll
          for (int c = 0; c < CHUNKS; ++c) {
            const std::int64_t col = layout.column(lane, i0 + c);
            if (col < layout.dim) {
              float v[VEC];
              load_vec<VEC>(table + r * stride + col, v);
#pragma unroll
              for (int e = 0; e < VEC; ++e) acc[c][e] = fmaf(wt, v[e], acc[c][e]);
            }
          }
        }
      }
    }
    if (valid) {
#pragma unroll
      for (int c = 0; c < CHUNKS; ++c) {
        const std::int64_t col = layout.column(lane, i0 + c);
        if (col < layout.dim) {
#pragma unroll
          for (int e = 0; e < VEC; ++e) out[t * out_stride + col + e] = acc[c][e];
        }
      }
    }
  }
}

/// The weights' gradient dw[t, j] = <dy[t], table[idx[t, j]]>, then (softmax_backward) the
/// scores' gradient w * (dw - sum over the head of w * dw). A sub-warp per token.
template <class T, int VEC>
__global__ void bag_dweights_kernel(const T* __restrict__ table, std::int64_t stride,
                                                              const std::int64_t* __restrict__ idx,
                                                              const float* __restrict__ weights,
                                                              const float* __restrict__ dy, std::int64_t dy_stride,
                                                              float* dweights, bool softmax_backward,
                                                              std::int64_t tokens, int heads, int knn, RowLayout layout) {
  const int lanes = layout.lanes;
  const auto [t, lane] = subwarp_position(lanes);
  const bool valid = t < tokens;
  const int bag = heads * knn;
  const std::int64_t iters = layout.iterations();
  for (int j0 = 0; j0 < bag; j0 += lanes) {
    int my_idx = 0;
    if (valid && j0 + lane < bag) my_idx = static_cast<int>(idx[t * bag + j0 + lane]);
    const int n = min(lanes, bag - j0);
    for (int jj = 0; jj < n; ++jj) {
      const std::int64_t r = __shfl_sync(kFull, my_idx, jj, lanes);
      float part = 0.0f;
      if (valid) {
        for (std::int64_t i = 0; i < iters; ++i) {
          const std::int64_t col = layout.column(lane, i);
          if (col < layout.dim) {
            float v[VEC];
            load_vec<VEC>(table + r * stride + col, v);
#pragma unroll
            for (int e = 0; e < VEC; ++e) part = fmaf(dy[t * dy_stride + col + e], v[e], part);
          }
        }
      }
      part = subwarp_sum(part, lanes);
      if (valid && lane == 0) dweights[t * bag + j0 + jj] = part;
    }
  }
  if (!softmax_backward) return;
  __syncwarp();
  const std::int64_t base = t * std::int64_t(bag);
  for (int h = 0; h < heads; ++h) {
    float s = 0.0f;
    for (int e = lane; e < knn; e += lanes) {
      if (valid) s += weights[base + h * knn + e] * dweights[base + h * knn + e];
    }
    s = subwarp_sum(s, lanes);
    __syncwarp();
    for (int e = lane; e < knn; e += lanes) {
      if (valid) {
        const std::int64_t k = base + h * knn + e;
        dweights[k] = weights[k] * (dweights[k] - s);
      }
    }
    __syncwarp();
  }
}

/// (slot, position) pairs to sort.
__global__ void make_pairs_kernel(const std::int64_t* __restrict__ idx, std::int64_t n, unsigned long long* keys,
                                  int* pos) {
  const std::int64_t p = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p < n) {
    keys[p] = static_cast<unsigned long long>(idx[p]);
    pos[p] = static_cast<int>(p);
  }
}

/// Each slot's gradient, reduced once in ascending position order (deterministic): a sub-warp
/// per segment u of the sorted pairs; written as sparse row u or added to the dense row.
template <int VEC>
__global__ void segment_reduce_kernel(
    const unsigned long long* __restrict__ unique, const int* __restrict__ counts, const int* __restrict__ offsets,
    const int* __restrict__ num_runs, const int* __restrict__ pos, const float* __restrict__ weights,
    const float* __restrict__ dy, std::int64_t dy_stride, int bag, std::int64_t capacity, RowLayout layout,
    bool sparse, std::int64_t* unique_out, float* grad_rows, std::int64_t* num_unique, float* dense,
    std::int64_t dense_stride) {
  const auto [u, lane] = subwarp_position(layout.lanes);
  const int runs = *num_runs;
  if (sparse && u == 0 && lane == 0) *num_unique = runs;
  if (u >= capacity || u >= runs) return;
  const Segment seg = segment(offsets, counts, u);
  const std::int64_t slot = static_cast<std::int64_t>(unique[u]);
  if (sparse && lane == 0) unique_out[u] = slot;
  for (std::int64_t i = 0; i < layout.iterations(); ++i) {
    const std::int64_t col = layout.column(lane, i);
    if (col >= layout.dim) break;
    float acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = 0.0f;
    for (std::int64_t k = 0; k < seg.count; ++k) {
      const int p = pos[seg.begin + k];
      const float w = weights[p];
      const float* d = dy + std::int64_t(p / bag) * dy_stride + col;
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] = fmaf(w, d[e], acc[e]);
    }
    float* dst = sparse ? grad_rows + u * layout.dim + col : dense + slot * dense_stride + col;
#pragma unroll
    for (int e = 0; e < VEC; ++e) dst[e] = sparse ? acc[e] : dst[e] + acc[e];
  }
}

/// The value gradient with atomics (comparison mode): a sub-warp per token adds w * dy[t] into
/// each of its rows of the dense gradient. Not deterministic.
__global__ void atomic_grad_kernel(const std::int64_t* __restrict__ idx,
                                                             const float* __restrict__ weights,
                                                             const float* __restrict__ dy, std::int64_t dy_stride,
                                                             std::int64_t tokens, int bag, float* dense,
                                                             std::int64_t dense_stride, RowLayout layout) {
  const auto [t, lane] = subwarp_position(layout.lanes);
  if (t >= tokens) return;
  for (int j = 0; j < bag; ++j) {
    const std::int64_t r = idx[t * bag + j];
    const float w = weights[t * bag + j];
    for (std::int64_t i = 0; i < layout.iterations(); ++i) {
      const std::int64_t col = layout.column(lane, i);
      if (col >= layout.dim) break;
      for (int e = 0; e < layout.vec; ++e) atomicAdd(dense + r * dense_stride + col + e, w * dy[t * dy_stride + col + e]);
    }
  }
}

/// Sets *flag when any of the n slot ids is outside [0, rows).
__global__ void check_indices_kernel(const std::int64_t* __restrict__ idx, std::int64_t n, std::int64_t rows, int* flag) {
  const std::int64_t p = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p < n && (idx[p] < 0 || idx[p] >= rows)) atomicOr(flag, 1);
}

inline Status cuda_status(cudaError_t e, const char* what, std::string* why) {
  if (e == cudaSuccess) return Status::ok;
  return fail(why, Status::cuda_error, std::string(what) + ": " + cudaGetErrorString(e));
}

inline unsigned grid_for(std::int64_t blocks) { return static_cast<unsigned>(blocks < 1 ? 1 : blocks); }

/// Runs the index check (flag in device memory), then synchronises and reads it back.
inline Status check_indices_on_device(const Bag& bag, std::int64_t rows, int* flag, cudaStream_t stream, std::string* why) {
  const std::int64_t n = bag.tokens * bag.size();
  Status s = cuda_status(cudaMemsetAsync(flag, 0, sizeof(int), stream), "cudaMemsetAsync", why);
  if (s != Status::ok) return s;
  check_indices_kernel<<<grid_for((n + kBlock - 1) / kBlock), kBlock, 0, stream>>>(bag.indices, n, rows, flag);
  if ((s = cuda_status(cudaGetLastError(), "index check launch", why)) != Status::ok) return s;
  int host = 0;
  if ((s = cuda_status(cudaMemcpyAsync(&host, flag, sizeof(int), cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync", why)) != Status::ok) return s;
  if ((s = cuda_status(cudaStreamSynchronize(stream), "cudaStreamSynchronize", why)) != Status::ok) return s;
  if (host != 0) return fail(why, Status::index_out_of_range, "bag.indices holds a slot id outside the table of " + std::to_string(rows) + " rows; nothing was written");
  return Status::ok;
}

/// Calls fn(T*, vec) with the table's element type and vector width.
template <class Fn>
void dispatch_table(const Table& t, int vec, Fn&& fn) {
  switch (t.dtype) {
    case Dtype::f32: vec == 1 ? fn(static_cast<const float*>(t.data), std::integral_constant<int, 1>{})
                              : fn(static_cast<const float*>(t.data), std::integral_constant<int, 4>{});
      break;
    case Dtype::bf16: vec == 1 ? fn(static_cast<const __nv_bfloat16*>(t.data), std::integral_constant<int, 1>{})
                               : fn(static_cast<const __nv_bfloat16*>(t.data), std::integral_constant<int, 8>{});
      break;
    case Dtype::f16: vec == 1 ? fn(static_cast<const __half*>(t.data), std::integral_constant<int, 1>{})
                              : fn(static_cast<const __half*>(t.data), std::integral_constant<int, 8>{});
      break;
    default: break;  // refused by the host checks (check_table) before any launch
  }
}

/// Vectors per lane per pass of the forward, by vector width (bounded registers: no spills).
template <int VEC>
constexpr int forward_chunks() { return VEC == 1 ? 4 : VEC == 4 ? 2 : 1; }

/// The CUB temporary storage the deterministic backward needs for n pairs of `bits`-bit keys.
inline Status cub_bytes(std::int64_t n, int bits, std::size_t* bytes, std::string* why) {
  std::size_t sort = 0, rle = 0, scan = 0;
  const int items = static_cast<int>(n);
  Status s = cuda_status(cub::DeviceRadixSort::SortPairs(nullptr, sort, static_cast<const unsigned long long*>(nullptr),
                                                         static_cast<unsigned long long*>(nullptr), static_cast<const int*>(nullptr),
                                                         static_cast<int*>(nullptr), items, 0, bits),
                         "cub::DeviceRadixSort::SortPairs (size query)", why);
  if (s != Status::ok) return s;
  s = cuda_status(cub::DeviceRunLengthEncode::Encode(nullptr, rle, static_cast<const unsigned long long*>(nullptr),
                                                     static_cast<unsigned long long*>(nullptr), static_cast<int*>(nullptr),
                                                     static_cast<int*>(nullptr), items),
                  "cub::DeviceRunLengthEncode::Encode (size query)", why);
  if (s != Status::ok) return s;
  s = cuda_status(cub::DeviceScan::ExclusiveSum(nullptr, scan, static_cast<const int*>(nullptr), static_cast<int*>(nullptr), items),
                  "cub::DeviceScan::ExclusiveSum (size query)", why);
  if (s != Status::ok) return s;
  *bytes = sort > rle ? (sort > scan ? sort : scan) : (rle > scan ? rle : scan);
  return Status::ok;
}

inline Status take_workspace(void* workspace, std::size_t* workspace_bytes, std::size_t need, bool* query, std::string* why) {
  *query = false;
  if (workspace_bytes == nullptr) return fail(why, Status::null_pointer, "workspace_bytes is null");
  if (workspace == nullptr) {
    *workspace_bytes = need;
    *query = true;
    return Status::ok;
  }
  if (*workspace_bytes < need) {
    const std::size_t given = *workspace_bytes;
    *workspace_bytes = need;
    return fail(why, Status::workspace_too_small, "workspace of " + std::to_string(given) + " bytes, expected at least " + std::to_string(need));
  }
  return Status::ok;
}

}  // namespace detail

/// The forward read: out[t] = sum_j w[t, j] * table[indices[t, j]]. With a null workspace,
/// writes the bytes the call needs to *workspace_bytes (never 0) and returns; otherwise
/// *workspace_bytes is the size given. Returns Status::ok or what is wrong (why,
/// if given, gets the field, its value and what was expected); a bad argument is found on
/// the host before any launch, and then nothing is written.
inline Status embedding_bag_forward(const ForwardArgs& a, void* workspace, std::size_t* workspace_bytes,
                                    cudaStream_t stream, std::string* why = nullptr) {
  using namespace detail;
  Status s = check_forward(a, why);
  if (s != Status::ok) return s;
  bool query = false;
  if ((s = take_workspace(workspace, workspace_bytes, forward_workspace(), &query, why)) != Status::ok || query) return s;
  if (a.bag.tokens == 0) return Status::ok;
  if (a.check_indices) {
    if ((s = check_indices_on_device(a.bag, a.table.rows, static_cast<int*>(workspace), stream, why)) != Status::ok) return s;
  }
  const RowLayout layout = row_layout(a.table.dtype, reinterpret_cast<std::uintptr_t>(a.table.data), a.table.stride, a.table.dim);
  const auto blocks = grid_for(blocks_for(a.bag.tokens, layout.lanes, kBlock));
  dispatch_table(a.table, layout.vec, [&](auto* table, auto vec) {
    constexpr int V = decltype(vec)::value;
    bag_forward_kernel<std::remove_const_t<std::remove_pointer_t<decltype(table)>>, V, forward_chunks<V>()>
        <<<blocks, kBlock, 0, stream>>>(table, a.table.stride, a.bag.indices, a.weights, a.weights_out, a.fused_softmax,
                                        a.bag.tokens, int(a.bag.heads), int(a.bag.knn), a.out, a.out_stride, layout);
  });
  return cuda_status(cudaGetLastError(), "embedding_bag_forward launch", why);
}

/// The backward of the read: the value gradient (args.output, args.reduction) and, if
/// args.dweights is set, the weights' gradient (or the scores', with softmax_backward).
/// Workspace as for the forward (the deterministic path needs 2 x 8 + 4 x 4 bytes per read
/// plus CUB's temporary storage; the query needs a CUDA device, for CUB's). The
/// deterministic path gives the same bits on every run.
inline Status embedding_bag_backward(const BackwardArgs& a, void* workspace, std::size_t* workspace_bytes,
                                     cudaStream_t stream, std::string* why = nullptr) {
  using namespace detail;
  Status s = check_backward(a, why);
  if (s != Status::ok) return s;
  const std::int64_t n = a.bag.tokens * a.bag.size();
  const bool sorted = a.reduction == Reduction::deterministic;
  const int bits = slot_bits(a.table.rows);
  std::size_t cub = 0;
  if (sorted && n > 0 && (s = cub_bytes(n, bits, &cub, why)) != Status::ok) return s;
  const BackwardWorkspace ws = backward_workspace(sorted ? n : 0, cub);
  bool query = false;
  if ((s = take_workspace(workspace, workspace_bytes, ws.total, &query, why)) != Status::ok || query) return s;
  auto* base = static_cast<unsigned char*>(workspace);
  if (n == 0) {
    if (a.output == GradOutput::sparse) {
      return cuda_status(cudaMemsetAsync(a.num_unique, 0, sizeof(std::int64_t), stream), "cudaMemsetAsync", why);
    }
    return Status::ok;
  }
  if (a.check_indices) {
    if ((s = check_indices_on_device(a.bag, a.table.rows, reinterpret_cast<int*>(base + ws.flag), stream, why)) != Status::ok) return s;
  }
  const int bag = int(a.bag.size());
  // The weights' (scores') gradient.
  if (a.dweights != nullptr) {
    const RowLayout use = row_layout(a.table.dtype, reinterpret_cast<std::uintptr_t>(a.table.data), a.table.stride, a.table.dim);
    const auto blocks = grid_for(blocks_for(a.bag.tokens, use.lanes, kBlock));
    dispatch_table(a.table, use.vec, [&](auto* table, auto vec) {
      constexpr int V = decltype(vec)::value;
      bag_dweights_kernel<std::remove_const_t<std::remove_pointer_t<decltype(table)>>, V><<<blocks, kBlock, 0, stream>>>(
          table, a.table.stride, a.bag.indices, a.weights, a.dy, a.dy_stride, a.dweights, a.softmax_backward, a.bag.tokens,
          int(a.bag.heads), int(a.bag.knn), use);
    });
    if ((s = cuda_status(cudaGetLastError(), "weights' gradient launch", why)) != Status::ok) return s;
  }
  // The value gradient: each lane sums 4 consecutive columns where the width allows.
  const bool dy4 = a.table.dim % 4 == 0;
  RowLayout grad_layout;
  grad_layout.vec = dy4 ? 4 : 1;
  grad_layout.lanes = lanes_for(a.table.dim, grad_layout.vec);
  grad_layout.dim = a.table.dim;
  if (!sorted) {
    atomic_grad_kernel<<<grid_for(blocks_for(a.bag.tokens, grad_layout.lanes, kBlock)), kBlock, 0, stream>>>(
        a.bag.indices, a.weights, a.dy, a.dy_stride, a.bag.tokens, bag, a.dense, a.dense_stride, grad_layout);
    return cuda_status(cudaGetLastError(), "atomic value gradient launch", why);
  }
  auto* keys_in = reinterpret_cast<unsigned long long*>(base + ws.keys_in);
  auto* keys_out = reinterpret_cast<unsigned long long*>(base + ws.keys_out);
  auto* pos_in = reinterpret_cast<int*>(base + ws.pos_in);
  auto* pos_out = reinterpret_cast<int*>(base + ws.pos_out);
  auto* unique = reinterpret_cast<unsigned long long*>(base + ws.unique);
  auto* counts = reinterpret_cast<int*>(base + ws.counts);
  auto* offsets = reinterpret_cast<int*>(base + ws.offsets);
  auto* num_runs = reinterpret_cast<int*>(base + ws.num_runs);
  void* temp = base + ws.cub;
  const int items = static_cast<int>(n);
  make_pairs_kernel<<<grid_for((n + kBlock - 1) / kBlock), kBlock, 0, stream>>>(a.bag.indices, n, keys_in, pos_in);
  if ((s = cuda_status(cudaGetLastError(), "pair launch", why)) != Status::ok) return s;
  std::size_t temp_bytes = cub;
  if ((s = cuda_status(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, pos_in, pos_out, items, 0, bits, stream),
                       "cub::DeviceRadixSort::SortPairs", why)) != Status::ok) return s;
  if ((s = cuda_status(cudaMemsetAsync(counts, 0, std::size_t(n) * sizeof(int), stream), "cudaMemsetAsync", why)) != Status::ok) return s;
  temp_bytes = cub;
  if ((s = cuda_status(cub::DeviceRunLengthEncode::Encode(temp, temp_bytes, keys_out, unique, counts, num_runs, items, stream),
                       "cub::DeviceRunLengthEncode::Encode", why)) != Status::ok) return s;
  temp_bytes = cub;
  if ((s = cuda_status(cub::DeviceScan::ExclusiveSum(temp, temp_bytes, counts, offsets, items, stream),
                       "cub::DeviceScan::ExclusiveSum", why)) != Status::ok) return s;
  const bool sparse = a.output == GradOutput::sparse;
  const auto blocks = grid_for(blocks_for(n, grad_layout.lanes, kBlock));
  if (grad_layout.vec == 4) {
    segment_reduce_kernel<4><<<blocks, kBlock, 0, stream>>>(unique, counts, offsets, num_runs, pos_out, a.weights, a.dy,
                                                            a.dy_stride, bag, n, grad_layout, sparse, a.unique_slots,
                                                            a.grad_rows, a.num_unique, a.dense, a.dense_stride);
  } else {
    segment_reduce_kernel<1><<<blocks, kBlock, 0, stream>>>(unique, counts, offsets, num_runs, pos_out, a.weights, a.dy,
                                                            a.dy_stride, bag, n, grad_layout, sparse, a.unique_slots,
                                                            a.grad_rows, a.num_unique, a.dense, a.dense_stride);
  }
  return cuda_status(cudaGetLastError(), "segment reduction launch", why);
}

}  // namespace pkm::cuda
