// pkm/cuda/args.hpp — the arguments of pkm's CUDA embedding-bag kernels and their host-side
// checks: plain C++ (no CUDA needed), so every check runs, and is tested, on any machine.
// Every pointer is a device pointer the caller owns; strides are in elements.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>

#include "pkm/cuda/layout.hpp"

namespace pkm::cuda {

enum class Status : int {
  ok = 0,
  null_pointer,        ///< a required pointer is null
  bad_size,            ///< a size is zero or negative, or too large
  bad_stride,          ///< a row stride is smaller than the row
  misaligned,          ///< a pointer is not aligned to its element type
  index_out_of_range,  ///< (with check_indices) a slot id outside the table; nothing was read there
  workspace_too_small,  ///< the workspace given is smaller than the query said
  bad_mode,    ///< a combination the kernels do not offer (atomic reduction into sparse rows)
  cuda_error,  ///< a CUDA call failed (no device, launch error, ...)
};

inline const char* status_name(Status s) {
  switch (s) {
    case Status::ok:
      return "ok";
    case Status::null_pointer:
      return "null_pointer";
    case Status::bad_size:
      return "bad_size";
    case Status::bad_stride:
      return "bad_stride";
    case Status::misaligned:
      return "misaligned";
    case Status::index_out_of_range:
      return "index_out_of_range";
    case Status::workspace_too_small:
      return "workspace_too_small";
    case Status::bad_mode:
      return "bad_mode";
    case Status::cuda_error:
      return "cuda_error";
  }
  return "?";
}

/// A value table in device memory: rows x dim elements of dtype, row r at data + r * stride.
struct Table {
  const void* data = nullptr;
  Dtype dtype = Dtype::f32;
  std::int64_t rows = 0, dim = 0, stride = 0;
};

/// The slots each token reads: indices[t * bag + j], j < bag = heads * knn, contiguous.
struct Bag {
  const std::int64_t* indices = nullptr;
  std::int64_t tokens = 0, heads = 1, knn = 0;
  std::int64_t size() const { return heads * knn; }
};

/// out[t] = sum_j w[t, j] * table[indices[t, j]] (fp32 accumulation).
struct ForwardArgs {
  Table table;
  Bag bag;
  /// tokens x bag weights; with fused_softmax, raw scores whose softmax per head (knn
  /// consecutive entries) is taken and written to weights_out (for the backward).
  const float* weights = nullptr;
  bool fused_softmax = false;
  float* weights_out = nullptr;
  float* out = nullptr;  ///< tokens rows of dim floats, row t at out + t * out_stride
  std::int64_t out_stride = 0;
  /// Check every slot id on the device: an id outside the table is not read (its term is
  /// skipped) and the call returns index_out_of_range, after a stream synchronisation.
  bool check_indices = false;
};

enum class GradOutput : int { sparse = 0, dense_add = 1 };
enum class Reduction : int { deterministic = 0, atomic = 1 };

/// The backward of ForwardArgs: the value gradient (sum over a slot's reads of w * dy) and the
/// weights' gradient <dy[t], table[indices[t, j]]> (or the scores', with softmax_backward).
struct BackwardArgs {
  Table table;
  Bag bag;
  const float* weights =
      nullptr;                ///< the forward's weights (its weights_out when it fused the softmax)
  const float* dy = nullptr;  ///< tokens rows of dim floats, row t at dy + t * dy_stride
  std::int64_t dy_stride = 0;
  /// tokens x bag: the weights' gradient, or with softmax_backward the raw scores'. May be
  /// null to skip it.
  float* dweights = nullptr;
  bool softmax_backward = false;
  GradOutput output = GradOutput::sparse;
  Reduction reduction = Reduction::deterministic;
  /// sparse: the unique slots, ascending (capacity tokens x bag), their gradient rows
  /// (capacity tokens x bag rows of dim floats, contiguous) and their number (one device int64).
  std::int64_t* unique_slots = nullptr;
  float* grad_rows = nullptr;
  std::int64_t* num_unique = nullptr;
  /// dense_add: the gradient is added into rows x dim floats, row r at dense + r * dense_stride.
  float* dense = nullptr;
  std::int64_t dense_stride = 0;
  bool check_indices = false;
};

namespace detail {

inline Status fail(std::string* why, Status s, const std::string& text) {
  if (why != nullptr) *why = std::string(status_name(s)) + ": " + text;
  return s;
}

inline bool aligned_to(const void* p, std::size_t a) {
  return reinterpret_cast<std::uintptr_t>(p) % a == 0;
}

inline Status check_table(const Table& t, std::string* why) {
  if (t.data == nullptr) return fail(why, Status::null_pointer, "table.data is null");
  if (t.rows < 1)
    return fail(why, Status::bad_size,
                "table.rows = " + std::to_string(t.rows) + ", expected >= 1");
  if (t.rows > std::numeric_limits<int>::max()) {
    return fail(
        why, Status::bad_size,
        "table.rows = " + std::to_string(t.rows) + ", expected at most 2^31 - 1 (split the table)");
  }
  if (t.dim < 1)
    return fail(why, Status::bad_size, "table.dim = " + std::to_string(t.dim) + ", expected >= 1");
  if (t.stride < t.dim) {
    return fail(why, Status::bad_stride,
                "table.stride = " + std::to_string(t.stride) +
                    ", expected >= table.dim = " + std::to_string(t.dim));
  }
  if (t.dtype != Dtype::f32 && t.dtype != Dtype::bf16 && t.dtype != Dtype::f16) {
    return fail(why, Status::bad_mode,
                "table.dtype = " + std::to_string(int(t.dtype)) + ", expected f32, bf16 or f16");
  }
  if (!aligned_to(t.data, std::size_t(dtype_bytes(t.dtype)))) {
    return fail(why, Status::misaligned,
                "table.data is not aligned to its " + std::to_string(dtype_bytes(t.dtype)) +
                    "-byte elements");
  }
  // Element offsets (rows - 1) * stride + dim must fit in int64 (and bytes in size_t).
  if (t.rows - 1 > (std::numeric_limits<std::int64_t>::max() / 4 - t.dim) / t.stride) {
    return fail(why, Status::bad_size,
                "table of " + std::to_string(t.rows) + " rows of stride " +
                    std::to_string(t.stride) + " is too large to address");
  }
  return Status::ok;
}

inline Status check_bag(const Bag& b, std::string* why) {
  if (b.tokens < 0)
    return fail(why, Status::bad_size,
                "bag.tokens = " + std::to_string(b.tokens) + ", expected >= 0");
  if (b.heads < 1)
    return fail(why, Status::bad_size,
                "bag.heads = " + std::to_string(b.heads) + ", expected >= 1");
  if (b.knn < 1)
    return fail(why, Status::bad_size, "bag.knn = " + std::to_string(b.knn) + ", expected >= 1");
  // tokens * heads * knn pairs are sorted with int positions.
  constexpr std::int64_t kMax = std::numeric_limits<int>::max();
  if (b.heads > kMax / b.knn || (b.tokens > 0 && b.tokens > kMax / (b.heads * b.knn))) {
    return fail(why, Status::bad_size,
                "bag of " + std::to_string(b.tokens) + " tokens x " + std::to_string(b.heads) +
                    " heads x " + std::to_string(b.knn) +
                    " reads exceeds 2^31 - 1 reads per call; split the batch");
  }
  if (b.tokens > 0 && b.indices == nullptr)
    return fail(why, Status::null_pointer, "bag.indices is null");
  return Status::ok;
}

inline Status check_rows(const char* name, const void* p, std::int64_t stride, std::int64_t dim,
                         std::string* why) {
  if (p == nullptr) return fail(why, Status::null_pointer, std::string(name) + " is null");
  if (!aligned_to(p, 4))
    return fail(why, Status::misaligned, std::string(name) + " is not aligned to 4-byte floats");
  if (stride < dim) {
    return fail(why, Status::bad_stride,
                std::string(name) + "_stride = " + std::to_string(stride) +
                    ", expected >= dim = " + std::to_string(dim));
  }
  return Status::ok;
}

inline Status check_floats(const char* name, const void* p, std::string* why) {
  if (p == nullptr) return fail(why, Status::null_pointer, std::string(name) + " is null");
  if (!aligned_to(p, 4))
    return fail(why, Status::misaligned, std::string(name) + " is not aligned to 4-byte floats");
  return Status::ok;
}

}  // namespace detail

/// Every check the forward makes on the host before any launch (why, if given, gets the
/// field, its value and what was expected).
inline Status check_forward(const ForwardArgs& a, std::string* why = nullptr) {
  Status s = detail::check_table(a.table, why);
  if (s == Status::ok) s = detail::check_bag(a.bag, why);
  if (s != Status::ok || a.bag.tokens == 0) return s;
  if ((s = detail::check_floats("weights", a.weights, why)) != Status::ok) return s;
  if (a.fused_softmax &&
      (s = detail::check_floats("weights_out", a.weights_out, why)) != Status::ok)
    return s;
  return detail::check_rows("out", a.out, a.out_stride, a.table.dim, why);
}

/// Every check the backward makes on the host before any launch.
inline Status check_backward(const BackwardArgs& a, std::string* why = nullptr) {
  Status s = detail::check_table(a.table, why);
  if (s == Status::ok) s = detail::check_bag(a.bag, why);
  if (s != Status::ok) return s;
  if (a.output != GradOutput::sparse && a.output != GradOutput::dense_add) {
    return detail::fail(
        why, Status::bad_mode,
        "output = " + std::to_string(int(a.output)) + ", expected sparse or dense_add");
  }
  if (a.reduction != Reduction::deterministic && a.reduction != Reduction::atomic) {
    return detail::fail(
        why, Status::bad_mode,
        "reduction = " + std::to_string(int(a.reduction)) + ", expected deterministic or atomic");
  }
  if (a.output == GradOutput::sparse && a.reduction == Reduction::atomic) {
    return detail::fail(why, Status::bad_mode,
                        "atomic reduction needs output = dense_add (sparse rows come from the "
                        "sorted, deterministic path)");
  }
  if (a.output == GradOutput::sparse) {
    if (a.num_unique == nullptr)
      return detail::fail(why, Status::null_pointer, "num_unique is null");
  }
  if (a.bag.tokens == 0) return Status::ok;
  if ((s = detail::check_floats("weights", a.weights, why)) != Status::ok) return s;
  if ((s = detail::check_rows("dy", a.dy, a.dy_stride, a.table.dim, why)) != Status::ok) return s;
  if (a.dweights != nullptr &&
      (s = detail::check_floats("dweights", a.dweights, why)) != Status::ok)
    return s;
  if (a.output == GradOutput::sparse) {
    if (a.unique_slots == nullptr)
      return detail::fail(why, Status::null_pointer, "unique_slots is null");
    return detail::check_floats("grad_rows", a.grad_rows, why);
  }
  return detail::check_rows("dense", a.dense, a.dense_stride, a.table.dim, why);
}

}  // namespace pkm::cuda
