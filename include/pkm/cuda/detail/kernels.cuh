// pkm/cuda/detail/kernels.cuh — the kernels behind pkm/cuda/embedding_bag.cuh (its
// functions check the arguments, size the workspace and launch these): the fused gather with
// its optional softmax, the weights' and scores' gradient, the deterministic segment reduction
// of the value gradient and its atomic comparison mode, and the device-side index check.
// Not for direct use: their arguments are checked only by the functions that launch them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

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
__device__ inline void subwarp_softmax(const float* scores, float* w_out, std::int64_t t,
                                       bool valid, int heads, int knn, int lane, int lanes) {
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
                                   const float* __restrict__ weights, float* w_out, bool softmax,
                                   std::int64_t tokens, int heads, int knn, float* __restrict__ out,
                                   std::int64_t out_stride, RowLayout layout) {
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
              for (int q = 0; q < 4; ++q)
                load_vec<VEC>(table + std::int64_t(r[q]) * stride + col, v[q]);
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
                                    const float* __restrict__ weights, const float* __restrict__ dy,
                                    std::int64_t dy_stride, float* dweights, bool softmax_backward,
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
__global__ void make_pairs_kernel(const std::int64_t* __restrict__ idx, std::int64_t n,
                                  unsigned long long* keys, int* pos) {
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
    const unsigned long long* __restrict__ unique, const int* __restrict__ counts,
    const int* __restrict__ offsets, const int* __restrict__ num_runs, const int* __restrict__ pos,
    const float* __restrict__ weights, const float* __restrict__ dy, std::int64_t dy_stride,
    int bag, std::int64_t capacity, RowLayout layout, bool sparse, std::int64_t* unique_out,
    float* grad_rows, std::int64_t* num_unique, float* dense, std::int64_t dense_stride) {
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
                                   const float* __restrict__ weights, const float* __restrict__ dy,
                                   std::int64_t dy_stride, std::int64_t tokens, int bag,
                                   float* dense, std::int64_t dense_stride, RowLayout layout) {
  const auto [t, lane] = subwarp_position(layout.lanes);
  if (t >= tokens) return;
  for (int j = 0; j < bag; ++j) {
    const std::int64_t r = idx[t * bag + j];
    const float w = weights[t * bag + j];
    for (std::int64_t i = 0; i < layout.iterations(); ++i) {
      const std::int64_t col = layout.column(lane, i);
      if (col >= layout.dim) break;
      for (int e = 0; e < layout.vec; ++e)
        atomicAdd(dense + r * dense_stride + col + e, w * dy[t * dy_stride + col + e]);
    }
  }
}

/// Sets *flag when any of the n slot ids is outside [0, rows).
__global__ void check_indices_kernel(const std::int64_t* __restrict__ idx, std::int64_t n,
                                     std::int64_t rows, int* flag) {
  const std::int64_t p = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p < n && (idx[p] < 0 || idx[p] >= rows)) atomicOr(flag, 1);
}

}  // namespace detail
}  // namespace pkm::cuda
