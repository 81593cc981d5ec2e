// pkm/optim/sparse_optimizer.hpp — what the sparse value-table optimizers share: a step
// touches only the rows of a sparse gradient, clips the gradient's norm on its own (the
// value table has its own max_grad_norm, as in the paper), and can run fused with the
// backward (step_segments: each row's gradient is reduced into a per-thread scratch row and
// applied at once, so no gradient rows are stored).
//
// A derived optimizer passes its name and validated Options (with lr and max_grad_norm) to
// the base and provides
//   template <class T> void update_row(std::int64_t row, T* w, const S* g, S grad_scale);
// which updates table row `row` (w, stored as T) from the gradient grad_scale * g. Rows of
// one step are unique, so rows are updated in parallel, each by one thread.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "pkm/detail/parallel.hpp"
#include "pkm/detail/segment_reduce.hpp"
#include "pkm/optim/grad_clip.hpp"
#include "pkm/optim/state.hpp"
#include "pkm/row_mask.hpp"
#include "pkm/sparse_grad.hpp"
#include "pkm/types.hpp"
#include "pkm/value_table.hpp"

namespace pkm::optim {

/// How a step sees a table whose columns are split over a group of processes
/// (pkm/distributed): each process steps its own columns, and what the single-process step
/// computes over whole rows — the gradient norm for clipping, row-wise Adagrad's mean of g^2
/// — is summed over the group with `sum` (adds n doubles in place over the group, with the
/// same bits on every process; pkm::distributed::Group::sum_ordered). full_dim is the width of
/// a whole row. Every process of the group must make the same step call.
struct ShardReduction {
  std::function<void(double* data, Index n)> sum;
  Index full_dim = 0;
};

template <class Derived, class S, class Options>
class SparseRowOptimizer {
 public:
  using scalar_type = S;
  using options_type = Options;

  /// The optimizer's name ("pkm::optim::LazyAdam"), as its messages give it.
  const char* name() const { return who_; }
  /// Rows and width of the table this optimizer was made for.
  Index rows() const { return rows_; }
  Index dim() const { return dim_; }
  /// Steps taken (calls of step / step_segments).
  std::int64_t steps() const { return step_; }
  const Options& options() const { return options_; }
  /// Changes the learning rate (for schedules); validated like the options.
  void set_lr(double lr) { options_ = detail::with_lr(options_, lr, who_); }

  /// From now on, step and step_segments (and so a layer's backward_fused) update only the
  /// gradient rows `mask` allows: the other rows get no update at all — value, moments, row
  /// step count and weight decay all unchanged — and the gradient norm (for clipping, and the
  /// value returned) is that of the allowed rows. Throws std::invalid_argument for a mask made
  /// for a table of another size. Sparse memory finetuning sets one per batch
  /// (pkm/slot_selection.hpp).
  void set_row_mask(RowMask mask) {
    mask.check_table(who_, rows_);
    mask_ = std::move(mask);
  }
  /// Every gradient row is updated again.
  void clear_row_mask() { mask_ = RowMask(); }
  /// The mask in force, or nullptr (a default RowMask, for no table, means none).
  const RowMask* row_mask() const { return mask_.table_rows() > 0 ? &mask_ : nullptr; }

  /// Throws std::invalid_argument unless `table` has the shape this optimizer was made for.
  template <class T>
  void check_table(const char* caller, const ValueTable<T>& table) const {
    if (table.rows() != rows_ || table.dim() != dim_) {
      throw std::invalid_argument(
          std::string(caller) + ": table is " + std::to_string(table.rows()) + " x " +
          std::to_string(table.dim()) + ", expected the " + std::to_string(rows_) + " x " +
          std::to_string(dim_) + " the optimizer was made for");
    }
  }

  /// Applies a sparse gradient (sorted unique rows, as backward() returns it) to `table`.
  /// Returns the gradient's norm before clipping. Everything is checked first: a bad shape
  /// or row id throws std::invalid_argument / std::out_of_range, a non-finite gradient
  /// std::runtime_error, and the table and the optimizer state are then unchanged.
  /// With `shards`, `table` is this process's columns of a table split over a group and the
  /// step is one process's part of a group step (see ShardReduction).
  template <class T>
  double step(ValueTable<T>& table, const SparseRowGrad<S>& grad,
              const ShardReduction* shards = nullptr) {
    check_table(who_, table);
    detail::check_step_counter(who_, step_);
    if (grad.size() > 0 && grad.dim != dim_) {
      throw std::invalid_argument(std::string(who_) +
                                  ": gradient dim = " + std::to_string(grad.dim) +
                                  ", expected the table's " + std::to_string(dim_));
    }
    grad.validate(who_, "the gradient", rows_);
    // The stored rows are cheap to read twice: the norm (and finiteness) always comes first.
    return apply(
        table, grad.rows, true, [&](Index u, S*) { return grad.values.row(u).data(); }, shards);
  }

  /// The fused step: the gradient of row seg.rows[u] is the sum over its contributions t of
  /// items[t].coef * source(items[t].source, row); it is reduced into a scratch row and
  /// applied at once, with no gradient table stored. The result equals building the
  /// SparseRowGrad with detail::segment_reduce and calling step(), bit for bit, errors
  /// included: the rows are reduced twice (first for the norm, throwing on a non-finite
  /// gradient before anything changes) unless clipping is off and the caller passes
  /// known_finite = true, having proven that no row's gradient or the norm can overflow
  /// (embedding_bag_backward_update does, from a bound on the sums). A row id outside the
  /// table throws std::out_of_range first.
  template <class T, class SourceFn>
  double step_segments(ValueTable<T>& table,
                       const std::vector<pkm::detail::RowContribution<S>>& items,
                       const pkm::detail::RowSegments& seg, SourceFn&& source,
                       bool known_finite = false, const ShardReduction* shards = nullptr) {
    check_table(who_, table);
    detail::check_step_counter(who_, step_);
    if (seg.size() > 0 && (seg.rows.front() < 0 || seg.rows.back() >= rows_)) {
      throw_row_out_of_range(seg.rows.front() < 0 ? seg.rows.front() : seg.rows.back());
    }
    return apply(
        table, seg.rows, options_.max_grad_norm > 0.0 || !known_finite,
        [&](Index u, S* scratch) {
          pkm::detail::reduce_segment(items, seg, u, dim_, source, scratch);
          return static_cast<const S*>(scratch);
        },
        shards);
  }

 protected:
  SparseRowOptimizer(const char* who, Index rows, Index dim, const Options& options)
      : who_(who), rows_(rows), dim_(dim), options_(options) {
    if (rows < 1 || dim < 1) {
      throw std::invalid_argument(std::string(who) + ": table is " + std::to_string(rows) + " x " +
                                  std::to_string(dim) + ", expected rows >= 1 and dim >= 1");
    }
    options_.validate(who);
  }
  std::int64_t& step_count() { return step_; }

  /// True in an optimizer whose update of a row needs a statistic of the whole row
  /// (row-wise Adagrad's sum of g^2); it then provides
  ///   template <class T> S row_statistic(const T* w, const S* g, S grad_scale) const;
  ///   template <class T> void update_row(std::int64_t r, T* w, const S* g, S grad_scale,
  ///                                      S statistic, Index full_dim);
  /// and a step over column shards sums the statistic over the group before updating.
  static constexpr bool kRowStatistic = false;

 private:
  [[noreturn]] void throw_row_out_of_range(std::int64_t r) const {
    throw std::out_of_range(std::string(who_) + ": gradient row id " + std::to_string(r) +
                            " is outside the table of " + std::to_string(rows_) + " rows");
  }

  /// The one update loop behind step and step_segments. row_grad(u, scratch) returns the
  /// gradient of all_rows[u] (in storage of its own, or computed into `scratch`, dim values);
  /// with a row mask, only the allowed ones are read.
  /// With norm_first, every row's gradient is formed once for the norm (throwing on a
  /// non-finite one before anything changes) and again for the update; otherwise the norm is
  /// gathered during the update. Either way it is the in-order sum of the per-row sums
  /// (summed over the group after that, with `shards`).
  template <class T, class RowGrad>
  double apply(ValueTable<T>& table, const std::vector<std::int64_t>& all_rows, bool norm_first,
               RowGrad&& all_row_grad, const ShardReduction* shards) {
    using Scratch = std::vector<S>;
    // With a row mask, the step sees only the allowed rows: its position i is all_rows[at(i)].
    const bool masked = row_mask() != nullptr;
    std::vector<Index> allowed;
    if (masked) allowed = mask_.allowed_positions(all_rows);
    auto at = [&](Index i) { return masked ? allowed[static_cast<std::size_t>(i)] : i; };
    auto row = [&](Index i) { return all_rows[static_cast<std::size_t>(at(i))]; };
    auto row_grad = [&](Index i, S* scratch) { return all_row_grad(at(i), scratch); };
    const Index n =
        masked ? static_cast<Index>(allowed.size()) : static_cast<Index>(all_rows.size());
    std::vector<double> sq(static_cast<std::size_t>(n));
    auto total_sq = [&] {
      double total = 0.0;
      for (double s : sq) total += s;
      if (shards != nullptr) shards->sum(&total, 1);
      return total;
    };
    S scale = S(1);
    double norm = 0.0;
    if (norm_first) {
      pkm::detail::parallel_blocks_with<Scratch>(
          n, pkm::detail::kSegmentBlock, [&](Scratch& g, Index b, Index e) {
            g.resize(static_cast<std::size_t>(dim_));
            for (Index u = b; u < e; ++u)
              sq[u] = detail::sum_of_squares_serial(row_grad(u, g.data()), dim_);
          });
      norm = std::sqrt(total_sq());
      if (!std::isfinite(norm)) throw_non_finite(sq, row, shards != nullptr);
      scale = static_cast<S>(clip_coefficient(norm, options_.max_grad_norm));
    }
    Derived& self = static_cast<Derived&>(*this);
    std::vector<double> stat;  // over column shards: each row's statistic, summed over the group
    if constexpr (Derived::kRowStatistic) {
      if (shards != nullptr) {
        stat.resize(static_cast<std::size_t>(n));
        pkm::detail::parallel_blocks_with<Scratch>(
            n, pkm::detail::kSegmentBlock, [&](Scratch& g, Index b, Index e) {
              g.resize(static_cast<std::size_t>(dim_));
              for (Index u = b; u < e; ++u)
                stat[u] = static_cast<double>(
                    self.row_statistic(table.row(row(u)), row_grad(u, g.data()), scale));
            });
        shards->sum(stat.data(), n);
      }
    }
    pkm::detail::parallel_blocks_with<Scratch>(
        n, pkm::detail::kSegmentBlock, [&](Scratch& g, Index b, Index e) {
          g.resize(static_cast<std::size_t>(dim_));
          for (Index u = b; u < e; ++u) {
            const S* grad = row_grad(u, g.data());
            if (!norm_first) sq[u] = detail::sum_of_squares_serial(grad, dim_);
            if constexpr (Derived::kRowStatistic) {
              if (shards != nullptr) {
                self.update_row(row(u), table.row(row(u)), grad, scale, static_cast<S>(stat[u]),
                                shards->full_dim);
                continue;
              }
            }
            self.update_row(row(u), table.row(row(u)), grad, scale);
          }
        });
    ++step_;
    return norm_first ? norm : std::sqrt(total_sq());
  }

  /// row(u): the table row of the step's u-th gradient row.
  template <class RowOf>
  [[noreturn]] void throw_non_finite(const std::vector<double>& sq, RowOf&& row,
                                     bool sharded) const {
    for (std::size_t u = 0; u < sq.size(); ++u) {
      if (!std::isfinite(sq[u])) {
        throw std::runtime_error(std::string(who_) + ": the gradient of table row " +
                                 std::to_string(row(Index(u))) +
                                 (sharded ? " (in this process's columns)" : "") +
                                 " is not finite; expected finite gradients (nothing was updated)");
      }
    }
    throw std::runtime_error(std::string(who_) +
                             (sharded ? ": the gradient norm over the group overflows, or "
                                        "another process's columns hold a non-finite gradient; "
                                        "nothing was updated"
                                      : ": the gradient norm overflows; nothing was updated"));
  }

  const char* who_;
  Index rows_ = 0, dim_ = 0;
  Options options_;
  std::int64_t step_ = 0;
  RowMask mask_;  // none while default-constructed (table_rows 0)
};

}  // namespace pkm::optim
