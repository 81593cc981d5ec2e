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
#include "pkm/cuda/detail/kernels.cuh"
#include "pkm/cuda/layout.hpp"

namespace pkm::cuda {
namespace detail {

inline Status cuda_status(cudaError_t e, const char* what, std::string* why) {
  if (e == cudaSuccess) return Status::ok;
  return fail(why, Status::cuda_error, std::string(what) + ": " + cudaGetErrorString(e));
}

inline unsigned grid_for(std::int64_t blocks) {
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

/// Runs the index check (flag in device memory), then synchronises and reads it back.
inline Status check_indices_on_device(const Bag& bag, std::int64_t rows, int* flag,
                                      cudaStream_t stream, std::string* why) {
  const std::int64_t n = bag.tokens * bag.size();
  Status s = cuda_status(cudaMemsetAsync(flag, 0, sizeof(int), stream), "cudaMemsetAsync", why);
  if (s != Status::ok) return s;
  check_indices_kernel<<<grid_for((n + kBlock - 1) / kBlock), kBlock, 0, stream>>>(bag.indices, n,
                                                                                   rows, flag);
  if ((s = cuda_status(cudaGetLastError(), "index check launch", why)) != Status::ok) return s;
  int host = 0;
  if ((s = cuda_status(cudaMemcpyAsync(&host, flag, sizeof(int), cudaMemcpyDeviceToHost, stream),
                       "cudaMemcpyAsync", why)) != Status::ok)
    return s;
  if ((s = cuda_status(cudaStreamSynchronize(stream), "cudaStreamSynchronize", why)) != Status::ok)
    return s;
  if (host != 0)
    return fail(why, Status::index_out_of_range,
                "bag.indices holds a slot id outside the table of " + std::to_string(rows) +
                    " rows; nothing was written");
  return Status::ok;
}

/// Calls fn(T*, vec) with the table's element type and vector width.
template <class Fn>
void dispatch_table(const Table& t, int vec, Fn&& fn) {
  switch (t.dtype) {
    case Dtype::f32:
      vec == 1 ? fn(static_cast<const float*>(t.data), std::integral_constant<int, 1>{})
               : fn(static_cast<const float*>(t.data), std::integral_constant<int, 4>{});
      break;
    case Dtype::bf16:
      vec == 1 ? fn(static_cast<const __nv_bfloat16*>(t.data), std::integral_constant<int, 1>{})
               : fn(static_cast<const __nv_bfloat16*>(t.data), std::integral_constant<int, 8>{});
      break;
    case Dtype::f16:
      vec == 1 ? fn(static_cast<const __half*>(t.data), std::integral_constant<int, 1>{})
               : fn(static_cast<const __half*>(t.data), std::integral_constant<int, 8>{});
      break;
    default:
      break;  // refused by the host checks (check_table) before any launch
  }
}

/// Vectors per lane per pass of the forward, by vector width (bounded registers: no spills).
template <int VEC>
constexpr int forward_chunks() {
  return VEC == 1 ? 4 : VEC == 4 ? 2 : 1;
}

/// The CUB temporary storage the deterministic backward needs for n pairs of `bits`-bit keys.
inline Status cub_bytes(std::int64_t n, int bits, std::size_t* bytes, std::string* why) {
  std::size_t sort = 0, rle = 0, scan = 0;
  const int items = static_cast<int>(n);
  Status s =
      cuda_status(cub::DeviceRadixSort::SortPairs(
                      nullptr, sort, static_cast<const unsigned long long*>(nullptr),
                      static_cast<unsigned long long*>(nullptr), static_cast<const int*>(nullptr),
                      static_cast<int*>(nullptr), items, 0, bits),
                  "cub::DeviceRadixSort::SortPairs (size query)", why);
  if (s != Status::ok) return s;
  s = cuda_status(cub::DeviceRunLengthEncode::Encode(
                      nullptr, rle, static_cast<const unsigned long long*>(nullptr),
                      static_cast<unsigned long long*>(nullptr), static_cast<int*>(nullptr),
                      static_cast<int*>(nullptr), items),
                  "cub::DeviceRunLengthEncode::Encode (size query)", why);
  if (s != Status::ok) return s;
  s = cuda_status(cub::DeviceScan::ExclusiveSum(nullptr, scan, static_cast<const int*>(nullptr),
                                                static_cast<int*>(nullptr), items),
                  "cub::DeviceScan::ExclusiveSum (size query)", why);
  if (s != Status::ok) return s;
  *bytes = sort > rle ? (sort > scan ? sort : scan) : (rle > scan ? rle : scan);
  return Status::ok;
}

inline Status take_workspace(void* workspace, std::size_t* workspace_bytes, std::size_t need,
                             bool* query, std::string* why) {
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
    return fail(why, Status::workspace_too_small,
                "workspace of " + std::to_string(given) + " bytes, expected at least " +
                    std::to_string(need));
  }
  return Status::ok;
}

}  // namespace detail

/// The forward read: out[t] = sum_j w[t, j] * table[indices[t, j]]. With a null workspace,
/// writes the bytes the call needs to *workspace_bytes (never 0) and returns; otherwise
/// *workspace_bytes is the size given. Returns Status::ok or what is wrong (why,
/// if given, gets the field, its value and what was expected); a bad argument is found on
/// the host before any launch, and then nothing is written.
inline Status embedding_bag_forward(const ForwardArgs& a, void* workspace,
                                    std::size_t* workspace_bytes, cudaStream_t stream,
                                    std::string* why = nullptr) {
  using namespace detail;
  Status s = check_forward(a, why);
  if (s != Status::ok) return s;
  bool query = false;
  if ((s = take_workspace(workspace, workspace_bytes, forward_workspace(), &query, why)) !=
          Status::ok ||
      query)
    return s;
  if (a.bag.tokens == 0) return Status::ok;
  if (a.check_indices) {
    if ((s = check_indices_on_device(a.bag, a.table.rows, static_cast<int*>(workspace), stream,
                                     why)) != Status::ok)
      return s;
  }
  const RowLayout layout = row_layout(a.table.dtype, reinterpret_cast<std::uintptr_t>(a.table.data),
                                      a.table.stride, a.table.dim);
  const auto blocks = grid_for(blocks_for(a.bag.tokens, layout.lanes, kBlock));
  dispatch_table(a.table, layout.vec, [&](auto* table, auto vec) {
    constexpr int V = decltype(vec)::value;
    bag_forward_kernel<std::remove_const_t<std::remove_pointer_t<decltype(table)>>, V,
                       forward_chunks<V>()><<<blocks, kBlock, 0, stream>>>(
        table, a.table.stride, a.bag.indices, a.weights, a.weights_out, a.fused_softmax,
        a.bag.tokens, int(a.bag.heads), int(a.bag.knn), a.out, a.out_stride, layout);
  });
  return cuda_status(cudaGetLastError(), "embedding_bag_forward launch", why);
}

/// The backward of the read: the value gradient (args.output, args.reduction) and, if
/// args.dweights is set, the weights' gradient (or the scores', with softmax_backward).
/// Workspace as for the forward (the deterministic path needs 2 x 8 + 4 x 4 bytes per read
/// plus CUB's temporary storage; the query needs a CUDA device, for CUB's). The
/// deterministic path gives the same bits on every run.
inline Status embedding_bag_backward(const BackwardArgs& a, void* workspace,
                                     std::size_t* workspace_bytes, cudaStream_t stream,
                                     std::string* why = nullptr) {
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
  if ((s = take_workspace(workspace, workspace_bytes, ws.total, &query, why)) != Status::ok ||
      query)
    return s;
  auto* base = static_cast<unsigned char*>(workspace);
  if (n == 0) {
    if (a.output == GradOutput::sparse) {
      return cuda_status(cudaMemsetAsync(a.num_unique, 0, sizeof(std::int64_t), stream),
                         "cudaMemsetAsync", why);
    }
    return Status::ok;
  }
  if (a.check_indices) {
    if ((s = check_indices_on_device(a.bag, a.table.rows, reinterpret_cast<int*>(base + ws.flag),
                                     stream, why)) != Status::ok)
      return s;
  }
  const int bag = int(a.bag.size());
  // The weights' (scores') gradient.
  if (a.dweights != nullptr) {
    const RowLayout use = row_layout(a.table.dtype, reinterpret_cast<std::uintptr_t>(a.table.data),
                                     a.table.stride, a.table.dim);
    const auto blocks = grid_for(blocks_for(a.bag.tokens, use.lanes, kBlock));
    dispatch_table(a.table, use.vec, [&](auto* table, auto vec) {
      constexpr int V = decltype(vec)::value;
      bag_dweights_kernel<std::remove_const_t<std::remove_pointer_t<decltype(table)>>, V>
          <<<blocks, kBlock, 0, stream>>>(table, a.table.stride, a.bag.indices, a.weights, a.dy,
                                          a.dy_stride, a.dweights, a.softmax_backward, a.bag.tokens,
                                          int(a.bag.heads), int(a.bag.knn), use);
    });
    if ((s = cuda_status(cudaGetLastError(), "weights' gradient launch", why)) != Status::ok)
      return s;
  }
  // The value gradient: each lane sums 4 consecutive columns where the width allows.
  const bool dy4 = a.table.dim % 4 == 0;
  RowLayout grad_layout;
  grad_layout.vec = dy4 ? 4 : 1;
  grad_layout.lanes = lanes_for(a.table.dim, grad_layout.vec);
  grad_layout.dim = a.table.dim;
  if (!sorted) {
    atomic_grad_kernel<<<grid_for(blocks_for(a.bag.tokens, grad_layout.lanes, kBlock)), kBlock, 0,
                         stream>>>(a.bag.indices, a.weights, a.dy, a.dy_stride, a.bag.tokens, bag,
                                   a.dense, a.dense_stride, grad_layout);
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
  make_pairs_kernel<<<grid_for((n + kBlock - 1) / kBlock), kBlock, 0, stream>>>(a.bag.indices, n,
                                                                                keys_in, pos_in);
  if ((s = cuda_status(cudaGetLastError(), "pair launch", why)) != Status::ok) return s;
  std::size_t temp_bytes = cub;
  if ((s = cuda_status(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, pos_in,
                                                       pos_out, items, 0, bits, stream),
                       "cub::DeviceRadixSort::SortPairs", why)) != Status::ok)
    return s;
  if ((s = cuda_status(cudaMemsetAsync(counts, 0, std::size_t(n) * sizeof(int), stream),
                       "cudaMemsetAsync", why)) != Status::ok)
    return s;
  temp_bytes = cub;
  if ((s = cuda_status(cub::DeviceRunLengthEncode::Encode(temp, temp_bytes, keys_out, unique,
                                                          counts, num_runs, items, stream),
                       "cub::DeviceRunLengthEncode::Encode", why)) != Status::ok)
    return s;
  temp_bytes = cub;
  if ((s = cuda_status(
           cub::DeviceScan::ExclusiveSum(temp, temp_bytes, counts, offsets, items, stream),
           "cub::DeviceScan::ExclusiveSum", why)) != Status::ok)
    return s;
  const bool sparse = a.output == GradOutput::sparse;
  const auto blocks = grid_for(blocks_for(n, grad_layout.lanes, kBlock));
  if (grad_layout.vec == 4) {
    segment_reduce_kernel<4><<<blocks, kBlock, 0, stream>>>(
        unique, counts, offsets, num_runs, pos_out, a.weights, a.dy, a.dy_stride, bag, n,
        grad_layout, sparse, a.unique_slots, a.grad_rows, a.num_unique, a.dense, a.dense_stride);
  } else {
    segment_reduce_kernel<1><<<blocks, kBlock, 0, stream>>>(
        unique, counts, offsets, num_runs, pos_out, a.weights, a.dy, a.dy_stride, bag, n,
        grad_layout, sparse, a.unique_slots, a.grad_rows, a.num_unique, a.dense, a.dense_stride);
  }
  return cuda_status(cudaGetLastError(), "segment reduction launch", why);
}

}  // namespace pkm::cuda
