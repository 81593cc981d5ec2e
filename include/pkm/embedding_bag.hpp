// pkm/embedding_bag.hpp — the weighted gather-sum of value rows (the "read" of a memory layer),
// forward and backward (the plain reference version the tests and benchmarks compare to is
// pkm/embedding_bag_ref.hpp, outside the umbrella header).
//
//   out(b, :) = sum_l weights(b, l) * table.row(indices(b, l))
//
// The backward returns the table gradient sparse (sorted unique rows, summed) and the weight
// gradient dweights(b, l) = <dy(b, :), table.row(indices(b, l))>.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "pkm/detail/bag_kernels.hpp"
#include "pkm/detail/checks.hpp"
#include "pkm/detail/parallel.hpp"
#include "pkm/detail/segment_reduce.hpp"
#include "pkm/detail/vec_math.hpp"
#include "pkm/sparse_grad.hpp"
#include "pkm/value_gradient.hpp"
#include "pkm/types.hpp"
#include "pkm/value_table.hpp"

namespace pkm {

namespace detail {
/// The type rows of a table of T are summed in: T itself for float and double.
template <class T>
struct accumulator {
  using type = T;
};
template <>
struct accumulator<bf16> {
  using type = float;
};
template <>
struct accumulator<fp16> {
  using type = float;
};
template <class T>
using accumulator_t = typename accumulator<T>::type;
template <class T>
struct identity {
  using type = T;
};
/// Blocks template deduction (the accumulation type comes from the table type).
template <class T>
using no_deduce = typename identity<T>::type;

template <class T, class S>
void check_bag_args(const char* who, const ValueTable<T>& table, const ConstIndexRef& idx,
                    const ConstMatrixRef<S>& w, const char* rows_name, Index rows, Index cols) {
  check_same_shape(who, "weights", w.rows(), w.cols(), idx.rows(), idx.cols());
  check_same_shape(who, rows_name, rows, cols, idx.rows(), table.dim());
  check_indices(who, idx, table.rows());
}
}  // namespace detail

/// pkm's gather: tokens split over threads; per token, the register-blocked, prefetching
/// kernel of detail/bag_kernels.hpp (AVX2 + FMA builds) or Eigen's vectorised loop. Each
/// token's sum runs in bag order, so results do not depend on the thread count.
template <class T, class S = detail::accumulator_t<T>>
void embedding_bag(const ValueTable<T>& table, const ConstIndexRef& indices,
                   const ConstMatrixRef<detail::no_deduce<S>>& weights,
                   MatrixRef<detail::no_deduce<S>> out) {
  detail::check_bag_args("pkm::embedding_bag", table, indices, weights, "out", out.rows(),
                         out.cols());
  const Index dim = table.dim(), bag = indices.cols();
  detail::parallel_blocks(indices.rows(), 8, [&](Index begin, Index end) {
    for (Index b = begin; b < end; ++b) {
      detail::bag_sum<T, S>(table.data(), table.stride(), indices.row(b).data(),
                            weights.row(b).data(), bag, dim, out.row(b).data());
    }
  });
}

namespace detail {
/// Throws std::runtime_error if a token's read (a row of `read`, the embedding bag of
/// `indices` over `table`) is not finite, naming the table row at fault (or the overflow when
/// every row it read is finite). `note` is appended to the message.
template <class T, class S>
void check_bag_read(const char* who, const ValueTable<T>& table, const ConstIndexRef& indices,
                    const ConstMatrixRef<S>& read, const std::string& note = "") {
  parallel_blocks(read.rows(), kTokenBlock, [&](Index b0, Index b1) {
    for (Index b = b0; b < b1; ++b) {
      if (all_finite(read.row(b).data(), read.cols())) continue;
      for (Index l = 0; l < indices.cols(); ++l) {
        const Index r = indices(b, l);
        if (!row_finite(table.row(r), table.dim())) {
          throw std::runtime_error(std::string(who) + ": value table row " + std::to_string(r) +
                                   ", read by token " + std::to_string(b) +
                                   ", holds a non-finite value; expected a finite table "
                                   "(pkm::first_non_finite_row finds every such row)" +
                                   note);
        }
      }
      throw std::runtime_error(
          std::string(who) + ": the read of token " + std::to_string(b) +
          " overflows: the value rows it reads are finite but their weighted sum is not" + note);
    }
  });
}
}  // namespace detail

/// Buffers the backward of embedding_bag reuses from call to call: pass the same one every
/// step and the grouping of the table gradient allocates nothing once warm.
template <class S>
struct BagBackwardScratch {
  std::vector<detail::RowContribution<S>> items;  ///< (row, token, weight), grouped by row
  detail::GroupScratch<S> group;
  detail::RowSegments segments;
  SparseRowGrad<S> local;  ///< this call's gradient, when it is merged into a non-empty one
};

namespace detail {
/// The common first half of the two backward variants: checks the arguments, writes
/// dweights(b, l) = <dy(b, :), table.row(indices(b, l))> and groups the table gradient's
/// contributions (row, token, weight) by row, each row's in (b, l) order, in `scratch`.
template <class T, class S>
void bag_backward_begin(const char* who, const ValueTable<T>& table, const ConstIndexRef& indices,
                        const ConstMatrixRef<S>& weights, const ConstMatrixRef<S>& dy,
                        MatrixRef<S> dweights, BagBackwardScratch<S>& scratch) {
  check_bag_args(who, table, indices, weights, "dy", dy.rows(), dy.cols());
  check_same_shape(who, "dweights", dweights.rows(), dweights.cols(), indices.rows(),
                   indices.cols());
  const Index dim = table.dim(), bag = indices.cols(), batch = indices.rows();
  auto& items = scratch.items;
  items.resize(static_cast<std::size_t>(batch * bag));
  parallel_blocks(batch, 8, [&](Index begin, Index end) {
    for (Index b = begin; b < end; ++b) {
      for (Index l = 0; l < bag; ++l) {
        dweights(b, l) = row_dot<T, S>(dy.row(b).data(), table.row(indices(b, l)), dim);
        items[static_cast<std::size_t>(b * bag + l)] = {indices(b, l), b, weights(b, l)};
      }
    }
  });
  group_by_row(items, table.rows(), scratch.group, scratch.segments);
}
}  // namespace detail

namespace detail {
/// sum_b max_d |dy(b, d)| * sum_l |w(b, l)|, in double over fixed blocks summed in order: an
/// upper bound on the magnitude of any element of the table gradient (inf if it overflows).
template <class S>
double gradient_bound(const ConstMatrixRef<S>& w, const ConstMatrixRef<S>& dy) {
  const Index B = dy.rows();
  const Index nblocks = (B + kTokenBlock - 1) / kTokenBlock;
  std::vector<double> partial(static_cast<std::size_t>(nblocks), 0.0);
  parallel_blocks(B, kTokenBlock, [&](Index b0, Index b1) {
    double sum = 0.0;
    for (Index b = b0; b < b1; ++b) {
      const double m = dy.cols() > 0 ? static_cast<double>(dy.row(b).cwiseAbs().maxCoeff()) : 0.0;
      sum += m * static_cast<double>(w.row(b).cwiseAbs().sum());
    }
    partial[static_cast<std::size_t>(b0 / kTokenBlock)] = sum;
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}
}  // namespace detail

namespace detail {
/// True when no element of the table gradient of (weights, dy) nor the norm of a gradient of
/// `full_dim`-wide rows bounded like it can overflow (see gradient_bound).
template <class S>
bool gradient_known_finite(const ConstMatrixRef<S>& w, const ConstMatrixRef<S>& dy,
                           Index full_dim) {
  const double limit = std::min(0.5 * static_cast<double>(std::numeric_limits<S>::max()),
                                1e150 / std::sqrt(static_cast<double>(full_dim)));
  return gradient_bound<S>(w, dy) <= limit;
}
}  // namespace detail

/// Backward of embedding_bag into a value-gradient sink (pkm/value_gradient.hpp): writes
/// dweights(b, l) = <dy(b, :), table.row(indices(b, l))>, then hands the sink the table
/// gradient sum_{b,l: indices(b,l) = r} weights(b, l) * dy(b, :) of each touched row r, its
/// contributions summed in (b, l) order. `scratch` holds buffers reused between calls.
template <class T, class S = detail::accumulator_t<T>, class Sink>
void embedding_bag_backward_to(const ValueTable<T>& table, const ConstIndexRef& indices,
                               const ConstMatrixRef<detail::no_deduce<S>>& weights,
                               const ConstMatrixRef<detail::no_deduce<S>>& dy,
                               MatrixRef<detail::no_deduce<S>> dweights, Sink&& sink,
                               BagBackwardScratch<S>& scratch) {
  const char* who = "pkm::embedding_bag_backward";
  check_sink(sink, who, table.rows(), table.dim());
  detail::bag_backward_begin<T, S>(who, table, indices, weights, dy, dweights, scratch);
  auto source = [&](std::int64_t token, std::int64_t) { return dy.row(token).data(); };
  const auto& items = scratch.items;
  const auto& seg = scratch.segments;
  const Index dim = table.dim();
  sink(seg.rows, dim,
       [&](Index u, S* out) { detail::reduce_segment(items, seg, u, dim, source, out); });
}

/// Backward of embedding_bag: dweights as above and the table gradient merged (added) into
/// `dtable` (a SparseRowGrad: sorted unique rows, one summed row each).
template <class T, class S = detail::accumulator_t<T>>
void embedding_bag_backward(const ValueTable<T>& table, const ConstIndexRef& indices,
                            const ConstMatrixRef<detail::no_deduce<S>>& weights,
                            const ConstMatrixRef<detail::no_deduce<S>>& dy,
                            MatrixRef<detail::no_deduce<S>> dweights,
                            SparseRowGrad<detail::no_deduce<S>>& dtable,
                            BagBackwardScratch<S>& scratch) {
  embedding_bag_backward_to<T, S>(table, indices, weights, dy, dweights,
                                  SparseRowGradSink<S>(dtable, scratch.local, "dtable"), scratch);
}

/// As above, with buffers of its own (allocated for this call).
template <class T, class S = detail::accumulator_t<T>>
void embedding_bag_backward(const ValueTable<T>& table, const ConstIndexRef& indices,
                            const ConstMatrixRef<detail::no_deduce<S>>& weights,
                            const ConstMatrixRef<detail::no_deduce<S>>& dy,
                            MatrixRef<detail::no_deduce<S>> dweights,
                            SparseRowGrad<detail::no_deduce<S>>& dtable) {
  BagBackwardScratch<S> scratch;
  embedding_bag_backward<T, S>(table, indices, weights, dy, dweights, dtable, scratch);
}

/// Backward of embedding_bag fused with a sparse optimizer (pkm/optim): writes dweights as
/// embedding_bag_backward does, then updates the table's touched rows with `optimizer`
/// (LazyAdam, RowWiseAdagrad, ...) straight from the grouped contributions, storing no
/// gradient rows. The table ends as after embedding_bag_backward into an empty gradient
/// followed by optimizer.step(table, gradient), bit for bit. Returns the gradient's norm
/// before clipping. Throws std::invalid_argument, before touching the table, for a bad shape
/// or a non-finite weight or dy.
template <class T, class S = detail::accumulator_t<T>, class Optimizer>
double embedding_bag_backward_update(ValueTable<T>& table, const ConstIndexRef& indices,
                                     const ConstMatrixRef<detail::no_deduce<S>>& weights,
                                     const ConstMatrixRef<detail::no_deduce<S>>& dy,
                                     MatrixRef<detail::no_deduce<S>> dweights, Optimizer& optimizer,
                                     BagBackwardScratch<S>& scratch) {
  static_assert(std::is_same_v<typename Optimizer::scalar_type, S>,
                "pkm::embedding_bag_backward_update: the optimizer's scalar type must be the "
                "gradient's scalar type S");
  const char* who = "pkm::embedding_bag_backward_update";
  detail::check_finite(who, "weights", weights, " (nothing was updated)");
  detail::check_finite(who, "dy", dy, " (nothing was updated)");
  detail::bag_backward_begin<T, S>(who, table, indices, weights, dy, dweights, scratch);
  // Every row's gradient is at most sum_b max|dy(b, :)| sum_l |weights(b, l)| in magnitude,
  // and the norm at most sqrt(dim) times that: below the limits, nothing can overflow and
  // the optimizer may skip its separate finiteness pass (the result is the same either way).
  return optimizer.step_segments(
      table, scratch.items, scratch.segments,
      [&](std::int64_t token, std::int64_t) { return dy.row(token).data(); },
      detail::gradient_known_finite<S>(weights, dy, table.dim()));
}

/// As above, with buffers of its own (allocated for this call).
template <class T, class S = detail::accumulator_t<T>, class Optimizer>
double embedding_bag_backward_update(ValueTable<T>& table, const ConstIndexRef& indices,
                                     const ConstMatrixRef<detail::no_deduce<S>>& weights,
                                     const ConstMatrixRef<detail::no_deduce<S>>& dy,
                                     MatrixRef<detail::no_deduce<S>> dweights,
                                     Optimizer& optimizer) {
  BagBackwardScratch<S> scratch;
  return embedding_bag_backward_update<T, S>(table, indices, weights, dy, dweights, optimizer,
                                             scratch);
}

}  // namespace pkm
