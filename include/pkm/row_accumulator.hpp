// pkm/row_accumulator.hpp — a value table's gradient summed over several backwards (gradient
// accumulation over micro-batches, or a layer used several times before one step) without
// merging sorted row lists: each touched row is summed in place in a table-shaped buffer of
// fresh pages (a page no row touches is never allocated), and the rows touched are remembered.
// Adding a backward's rows costs what computing them costs; gradient() hands the sum to a
// sparse optimizer as the SparseRowGrad one backward of the whole batch would have made.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "pkm/page_buffer.hpp"
#include "pkm/detail/parallel.hpp"
#include "pkm/detail/segment_reduce.hpp"
#include "pkm/sparse_grad.hpp"
#include "pkm/types.hpp"
#include "pkm/value_table.hpp"

namespace pkm {

template <class S>
class RowAccumulator {
 public:
  RowAccumulator() = default;
  /// For a table of rows x dim. Nothing is allocated until the first add.
  RowAccumulator(Index rows, Index dim) : rows_(rows), dim_(dim) {
    if (rows < 1 || dim < 1) {
      throw std::invalid_argument("pkm::RowAccumulator: table is " + std::to_string(rows) + " x " +
                                  std::to_string(dim) + ", expected rows >= 1 and dim >= 1");
    }
  }

  Index rows() const { return rows_; }
  Index dim() const { return dim_; }
  /// Rows holding an accumulated gradient.
  Index touched() const { return static_cast<Index>(count_); }
  bool empty() const { return count_ == 0; }

  /// Adds the gradient rows of one backward: row ids `ids` (unique, inside the table: checked
  /// first, std::invalid_argument / std::out_of_range and nothing added otherwise); the
  /// gradient of ids[u] is written by reduce(u, out) into `out` (dim values). Rows in parallel.
  template <class Reduce>
  void add_rows(const std::vector<std::int64_t>& ids, Reduce&& reduce) {
    const char* who = "pkm::RowAccumulator::add_rows";
    check_made(who);
    std::vector<std::uint8_t> seen;
    for (std::size_t u = 0; u < ids.size(); ++u) {
      const std::int64_t r = ids[u];
      if (r < 0 || r >= rows_) {
        throw std::out_of_range(std::string(who) + ": row id " + std::to_string(r) +
                                " at position " + std::to_string(u) + " is outside the table of " +
                                std::to_string(rows_) + " rows");
      }
      if (seen.empty()) seen.assign(static_cast<std::size_t>(rows_), 0);
      if (seen[static_cast<std::size_t>(r)]++) {
        throw std::invalid_argument(std::string(who) + ": row id " + std::to_string(r) +
                                    " appears twice; expected unique ids");
      }
    }
    if (ids.empty()) return;
    if (!sum_) {
      sum_ = std::make_unique<PageBuffer<S>>(static_cast<std::size_t>(rows_) *
                                             static_cast<std::size_t>(dim_));
      touched_.assign(static_cast<std::size_t>(rows_), 0);
    }
    S* sum = sum_->data();
    const Index n = static_cast<Index>(ids.size());
    detail::parallel_blocks_with<std::vector<S>>(
        n, detail::kSegmentBlock, [&](std::vector<S>& scratch, Index b, Index e) {
          scratch.resize(static_cast<std::size_t>(dim_));
          for (Index u = b; u < e; ++u) {
            const auto r = static_cast<std::size_t>(ids[static_cast<std::size_t>(u)]);
            S* row = sum + r * static_cast<std::size_t>(dim_);
            if (!touched_[r]) {  // the first gradient of this row: written in place
              reduce(u, row);
              continue;
            }
            reduce(u, scratch.data());
            for (Index d = 0; d < dim_; ++d) row[d] += scratch[static_cast<std::size_t>(d)];
          }
        });
    for (std::int64_t r : ids) {
      auto& t = touched_[static_cast<std::size_t>(r)];
      if (!t) ++count_;
      t = 1;
    }
  }

  /// As a value-gradient sink (pkm/value_gradient.hpp): a backward's rows are added.
  void check(const char* who, Index table_rows, Index dim) const {
    if (table_rows != rows_ || dim != dim_) {
      throw std::invalid_argument(std::string(who) + ": the accumulator is for a table of " +
                                  std::to_string(rows_) + " x " + std::to_string(dim_) +
                                  ", this backward's is " + std::to_string(table_rows) + " x " +
                                  std::to_string(dim));
    }
  }
  template <class Reduce>
  void operator()(const std::vector<std::int64_t>& ids, Index dim, Reduce&& reduce) {
    check("pkm::RowAccumulator", rows_, dim);
    add_rows(ids, reduce);
  }

  /// Adds a sparse gradient (validated first).
  void add(const SparseRowGrad<S>& g) {
    const char* who = "pkm::RowAccumulator::add";
    check_made(who);
    g.validate(who, "the gradient", rows_);
    if (!g.empty() && g.dim != dim_) {
      throw std::invalid_argument(std::string(who) + ": the gradient has rows of " +
                                  std::to_string(g.dim) + ", expected " + std::to_string(dim_));
    }
    add_rows(g.rows, [&](Index u, S* out) {
      std::copy(g.values.row(u).data(), g.values.row(u).data() + dim_, out);
    });
  }

  /// The accumulated gradient: the touched rows, ascending, with their sums.
  SparseRowGrad<S> gradient() const {
    SparseRowGrad<S> g;
    g.dim = dim_;
    g.values.resize(static_cast<Index>(count_), dim_);
    if (count_ == 0) return g;
    g.rows.reserve(count_);
    for (std::size_t r = 0; r < touched_.size(); ++r) {
      if (touched_[r]) g.rows.push_back(static_cast<std::int64_t>(r));
    }
    const S* sum = sum_->data();
    detail::parallel_blocks(
        static_cast<Index>(count_), detail::kSegmentBlock, [&](Index b, Index e) {
          for (Index u = b; u < e; ++u) {
            const S* row = sum + static_cast<std::size_t>(g.rows[static_cast<std::size_t>(u)]) *
                                     static_cast<std::size_t>(dim_);
            std::copy(row, row + dim_, g.values.row(u).data());
          }
        });
    return g;
  }

  /// One step of a sparse optimizer (made for `table`) from the accumulated gradient, read in
  /// place (no copy of the rows: each row goes through the step's scratch, as a fused
  /// backward's do); the same step as optimizer.step(table, gradient()). Returns the
  /// gradient's norm before clipping. The accumulator is left as it is (clear() it after).
  template <class Optimizer, class T>
  double step(Optimizer& optimizer, ValueTable<T>& table) const {
    std::vector<detail::RowContribution<S>> items;
    detail::RowSegments seg;
    items.reserve(count_);
    seg.rows.reserve(count_);
    seg.starts.reserve(count_ + 1);
    for (std::size_t r = 0; r < touched_.size(); ++r) {
      if (!touched_[r]) continue;
      seg.starts.push_back(items.size());
      seg.rows.push_back(static_cast<std::int64_t>(r));
      items.push_back({static_cast<std::int64_t>(r), static_cast<std::int64_t>(r), S(1)});
    }
    seg.starts.push_back(items.size());
    const S* sum = sum_ ? sum_->data() : nullptr;
    const Index dim = dim_;
    return optimizer.step_segments(table, items, seg, [&](std::int64_t row, std::int64_t) {
      return sum + static_cast<std::size_t>(row) * static_cast<std::size_t>(dim);
    });
  }

  /// Forgets every accumulated row (their memory is returned to the kernel).
  void clear() {
    sum_.reset();
    touched_.clear();
    count_ = 0;
  }

 private:
  void check_made(const char* who) const {
    if (rows_ < 1)
      throw std::invalid_argument(std::string(who) + ": the accumulator was default-constructed");
  }

  Index rows_ = 0, dim_ = 0;
  std::unique_ptr<PageBuffer<S>> sum_;
  std::vector<std::uint8_t> touched_;
  std::size_t count_ = 0;
};

}  // namespace pkm
