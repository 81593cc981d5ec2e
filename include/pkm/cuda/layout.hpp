// pkm/cuda/layout.hpp — the index arithmetic of pkm's CUDA kernels: which thread handles
// which (token, column), how a table row is read in vectors, where the value gradient's
// segments start, and how the workspace is carved. Plain C++ (__host__ __device__ under
// nvcc), so the CPU tests prove it covers every element exactly once for any shape.
#pragma once

#include <cstddef>
#include <cstdint>

#include "pkm/dtype.hpp"

#if defined(__CUDACC__)
#define PKM_HD __host__ __device__
#else
#define PKM_HD
#endif

namespace pkm::cuda {

/// A value table's element type: pkm::Dtype f32, bf16 or f16 (accumulation is always fp32).
using DType [[deprecated("use pkm::Dtype")]] = pkm::Dtype;

PKM_HD inline int dtype_bytes(Dtype t) { return t == Dtype::f32 ? 4 : 2; }

namespace detail {

constexpr int kWarp = 32;
constexpr std::size_t kWorkspaceAlign = 256;  // every workspace buffer starts on this boundary

/// How a sub-warp of `lanes` threads covers one token's row of `dim` columns: lane l reads the
/// `vec` consecutive columns starting at column(l, i) for i = 0, 1, ... while that is < dim.
/// vec divides dim (a vector never straddles the row's end), lanes is a power of two <= 32.
struct RowLayout {
  int vec = 1;     // elements per load (16 bytes / element size, or 1)
  int lanes = 32;  // threads per token
  std::int64_t dim = 0;

  /// Loads per lane to cover the row (the last may be partial: column() >= dim ends it).
  PKM_HD std::int64_t iterations() const {
    const std::int64_t per_pass = std::int64_t(vec) * lanes;
    return (dim + per_pass - 1) / per_pass;
  }
  /// First column of lane l's i-th load.
  PKM_HD std::int64_t column(int lane, std::int64_t i) const {
    return (i * lanes + lane) * std::int64_t(vec);
  }
  /// Tokens one warp of 32 threads handles.
  PKM_HD int tokens_per_warp() const { return kWarp / lanes; }
};

/// Elements per 16-byte load for a table of `dtype` when every row start is 16-byte aligned
/// (pointer and stride) and the width divides into whole vectors; else 1 (scalar loads).
PKM_HD inline int vector_width(Dtype dtype, std::uintptr_t data, std::int64_t stride,
                               std::int64_t dim) {
  const int esize = dtype_bytes(dtype);
  const int vec = 16 / esize;
  const bool aligned = data % 16 == 0 && (stride * esize) % 16 == 0 && dim % vec == 0;
  return aligned ? vec : 1;
}

/// The sub-warp width for rows of `dim` columns read `vec` at a time: the smallest power of
/// two >= dim / vec, at least 4 and at most 32. Narrow rows pack several tokens in a warp.
PKM_HD inline int lanes_for(std::int64_t dim, int vec) {
  const std::int64_t loads = (dim + vec - 1) / vec;
  int lanes = 4;
  while (lanes < kWarp && lanes < loads) lanes *= 2;
  return lanes;
}

PKM_HD inline RowLayout row_layout(Dtype dtype, std::uintptr_t data, std::int64_t stride,
                                   std::int64_t dim) {
  RowLayout l;
  l.vec = vector_width(dtype, data, stride, dim);
  l.lanes = lanes_for(dim, l.vec);
  l.dim = dim;
  return l;
}

/// Thread t (global, in blocks of `block_threads`) works on token token_of(t) (which may be
/// >= tokens: that thread then only takes part in its sub-warp's shuffles) as lane lane_of(t).
PKM_HD inline std::int64_t token_of(std::int64_t thread, int lanes) { return thread / lanes; }
PKM_HD inline int lane_of(std::int64_t thread, int lanes) { return int(thread % lanes); }
/// Blocks of `block_threads` threads for `items` sub-warps of `lanes` threads.
PKM_HD inline std::int64_t blocks_for(std::int64_t items, int lanes, int block_threads) {
  const std::int64_t threads = items * lanes;
  return (threads + block_threads - 1) / block_threads;
}

/// Radix-sort bits that slot ids below `rows` need (at least 1).
PKM_HD inline int slot_bits(std::int64_t rows) {
  int bits = 1;
  while (bits < 63 && (std::int64_t(1) << bits) < rows) ++bits;
  return bits;
}

/// Segment u of the sorted (slot, position) pairs: positions [begin(u), begin(u) + count(u)),
/// begin being the exclusive prefix sum of the run lengths.
struct Segment {
  std::int64_t begin = 0, count = 0;
};
PKM_HD inline Segment segment(const int* offsets, const int* counts, std::int64_t u) {
  return Segment{offsets[u], counts[u]};
}

PKM_HD inline std::size_t align_up(std::size_t bytes) {
  return (bytes + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign;
}

/// Where each buffer of the backward's workspace starts (byte offsets from the workspace's
/// start, each kWorkspaceAlign-aligned), for n = tokens x bag (slot, position) pairs and a
/// CUB temporary of cub_bytes. total is the size to allocate.
struct BackwardWorkspace {
  std::size_t keys_in = 0, keys_out = 0, pos_in = 0, pos_out = 0, unique = 0, counts = 0,
              offsets = 0, num_runs = 0, flag = 0, cub = 0, total = 0;
};
PKM_HD inline BackwardWorkspace backward_workspace(std::int64_t n, std::size_t cub_bytes) {
  BackwardWorkspace w;
  const auto un = static_cast<std::size_t>(n);
  std::size_t at = 0;
  auto take = [&](std::size_t bytes) {
    const std::size_t here = at;
    at += align_up(bytes);
    return here;
  };
  w.keys_in = take(un * 8);
  w.keys_out = take(un * 8);
  w.pos_in = take(un * 4);
  w.pos_out = take(un * 4);
  w.unique = take(un * 8);
  w.counts = take(un * 4);
  w.offsets = take(un * 4);
  w.num_runs = take(4);
  w.flag = take(4);
  w.cub = take(cub_bytes);
  w.total = at;
  return w;
}

/// The forward's workspace: the index-check flag. Never 0 bytes (as CUB's queries), so a
/// caller always passes a real buffer and a null workspace always means "query".
PKM_HD inline std::size_t forward_workspace() { return align_up(4); }

}  // namespace detail
}  // namespace pkm::cuda
