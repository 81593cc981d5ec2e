// pkm/optim/sparse_optimizer.hpp — what the sparse value-table optimizers share: a step
// touches only the rows of a sparse gradient, clips the gradient's norm on its own (the
// value table has its own max_grad_norm, as in the paper), and can run fused with the
// backward (step_segments: each row's gradient is reduced into a per-thread scratch row and
// applied at once, so no gradient rows are stored).
//
// A derived optimizer provides
//   template <class T> void update_row(std::int64_t row, T* w, const S* g, S grad_scale);
// which updates table row `row` (w, stored as T) from the gradient grad_scale * g. Rows of
// one step are unique, so rows are updated in parallel, each by one thread.
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "pkm/detail/parallel.hpp"
#include "pkm/detail/segment_reduce.hpp"
#include "pkm/optim/grad_clip.hpp"
#include "pkm/sparse_grad.hpp"
#include "pkm/types.hpp"
#include "pkm/value_table.hpp"

namespace pkm::optim {

template <class Derived, class S>
class SparseRowOptimizer {
 public:
  using scalar_type = S;

  /// Rows and width of the table this optimizer was made for.
  Index rows() const { return rows_; }
  Index dim() const { return dim_; }
  /// Steps taken (calls of step / step_segments).
  std::int64_t steps() const { return step_; }

  /// Applies a sparse gradient (sorted unique rows, as backward() returns it) to `table`.
  /// Returns the gradient's norm before clipping. Everything is checked first: a bad shape
  /// or row id throws std::invalid_argument / std::out_of_range, a non-finite gradient
  /// std::runtime_error, and the table and the optimizer state are then unchanged.
  template <class T>
  double step(ValueTable<T>& table, const SparseRowGrad<S>& grad) {
    const char* who = derived().name();
    check_table(who, table);
    const Index n = grad.size();
    if (n > 0) {
      if (grad.dim != dim_ || grad.values.rows() != n || grad.values.cols() != dim_) {
        throw std::invalid_argument(std::string(who) + ": gradient values are " +
                                    std::to_string(grad.values.rows()) + " x " +
                                    std::to_string(grad.values.cols()) + " (dim " +
                                    std::to_string(grad.dim) + "), expected rows.size() x dim = " +
                                    std::to_string(n) + " x " + std::to_string(dim_));
      }
      for (Index u = 0; u < n; ++u) {
        const std::int64_t r = grad.rows[u];
        if (r < 0 || r >= rows_) {
          throw std::out_of_range(std::string(who) + ": gradient row id " + std::to_string(r) +
                                  " is outside the table of " + std::to_string(rows_) + " rows");
        }
        if (u > 0 && r <= grad.rows[u - 1]) {
          throw std::invalid_argument(std::string(who) + ": gradient row ids are not sorted and "
                                      "unique (" + std::to_string(grad.rows[u - 1]) + " then " +
                                      std::to_string(r) + "); expected a SparseRowGrad as backward() makes it");
        }
      }
    }
    std::vector<double> sq(static_cast<std::size_t>(n));
    pkm::detail::parallel_for(n, [&](Index u) { sq[u] = detail::sum_of_squares_serial(grad.values.row(u).data(), dim_); });
    const double norm = finite_norm(who, sq, [&](Index u) { return grad.rows[u]; });
    const S scale = static_cast<S>(clip_coefficient(norm, max_grad_norm()));
    pkm::detail::parallel_blocks(n, pkm::detail::kSegmentBlock, [&](Index b, Index e) {
      for (Index u = b; u < e; ++u) derived().update_row(grad.rows[u], table.row(grad.rows[u]), grad.values.row(u).data(), scale);
    });
    ++step_;
    return norm;
  }

  /// The fused step: the gradient of row seg.rows[u] is the sum over its contributions t of
  /// items[t].coef * source(items[t].source, row); it is reduced into a scratch row and
  /// applied at once, with no gradient table stored. With clipping on, the rows are reduced
  /// twice (first for the norm). The result equals building the SparseRowGrad with
  /// detail::segment_reduce and calling step(), bit for bit. The caller guarantees finite
  /// sources and coefficients; a row id outside the table throws std::out_of_range first.
  template <class T, class SourceFn>
  double step_segments(ValueTable<T>& table, const std::vector<pkm::detail::RowContribution<S>>& items,
                       const pkm::detail::RowSegments& seg, SourceFn&& source) {
    const char* who = derived().name();
    check_table(who, table);
    const Index n = seg.size();
    if (n > 0 && (seg.rows.front() < 0 || seg.rows.back() >= rows_)) {
      const std::int64_t bad = seg.rows.front() < 0 ? seg.rows.front() : seg.rows.back();
      throw std::out_of_range(std::string(who) + ": gradient row id " + std::to_string(bad) +
                              " is outside the table of " + std::to_string(rows_) + " rows");
    }
    std::vector<double> sq(static_cast<std::size_t>(n));
    using Scratch = std::vector<S>;
    const bool clip = max_grad_norm() > 0.0;
    double norm = 0.0;
    S scale = S(1);
    if (clip) {
      pkm::detail::parallel_blocks_with<Scratch>(n, pkm::detail::kSegmentBlock, [&](Scratch& g, Index b, Index e) {
        g.resize(static_cast<std::size_t>(dim_));
        for (Index u = b; u < e; ++u) {
          pkm::detail::reduce_segment(items, seg, u, dim_, source, g.data());
          sq[u] = detail::sum_of_squares_serial(g.data(), dim_);
        }
      });
      norm = finite_norm(who, sq, [&](Index u) { return seg.rows[u]; });
      scale = static_cast<S>(clip_coefficient(norm, max_grad_norm()));
    }
    pkm::detail::parallel_blocks_with<Scratch>(n, pkm::detail::kSegmentBlock, [&](Scratch& g, Index b, Index e) {
      g.resize(static_cast<std::size_t>(dim_));
      for (Index u = b; u < e; ++u) {
        pkm::detail::reduce_segment(items, seg, u, dim_, source, g.data());
        if (!clip) sq[u] = detail::sum_of_squares_serial(g.data(), dim_);
        derived().update_row(seg.rows[u], table.row(seg.rows[u]), g.data(), scale);
      }
    });
    if (!clip) {
      double total = 0.0;
      for (double s : sq) total += s;
      norm = std::sqrt(total);
    }
    ++step_;
    return norm;
  }

 protected:
  SparseRowOptimizer(const char* who, Index rows, Index dim) : rows_(rows), dim_(dim) {
    if (rows < 1 || dim < 1) {
      throw std::invalid_argument(std::string(who) + ": table is " + std::to_string(rows) + " x " +
                                  std::to_string(dim) + ", expected rows >= 1 and dim >= 1");
    }
  }
  std::int64_t& step_count() { return step_; }

 private:
  Derived& derived() { return static_cast<Derived&>(*this); }
  double max_grad_norm() const { return static_cast<const Derived&>(*this).options().max_grad_norm; }

  template <class T>
  void check_table(const char* who, const ValueTable<T>& table) const {
    if (table.rows() != rows_ || table.dim() != dim_) {
      throw std::invalid_argument(std::string(who) + ": table is " + std::to_string(table.rows()) +
                                  " x " + std::to_string(table.dim()) + ", expected the " +
                                  std::to_string(rows_) + " x " + std::to_string(dim_) +
                                  " the optimizer was made for");
    }
  }

  /// sqrt of the in-order sum of the per-row squares; throws naming a non-finite row.
  template <class RowOf>
  static double finite_norm(const char* who, const std::vector<double>& sq, RowOf&& row_of) {
    double total = 0.0;
    for (double s : sq) total += s;
    if (std::isfinite(total)) return std::sqrt(total);
    for (std::size_t u = 0; u < sq.size(); ++u) {
      if (!std::isfinite(sq[u])) {
        throw std::runtime_error(std::string(who) + ": the gradient of table row " +
                                 std::to_string(row_of(static_cast<Index>(u))) +
                                 " is not finite; expected finite gradients (nothing was updated)");
      }
    }
    throw std::runtime_error(std::string(who) + ": the gradient norm overflows; nothing was updated");
  }

  Index rows_ = 0, dim_ = 0;
  std::int64_t step_ = 0;
};

}  // namespace pkm::optim
