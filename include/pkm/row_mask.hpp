// pkm/row_mask.hpp — the rows of a value table an update may change. Sparse memory
// finetuning (pkm/slot_selection.hpp) makes one per batch; a sparse optimizer given one
// (SparseRowOptimizer::set_row_mask) updates only the gradient rows it allows — a masked row
// gets no update at all: no value change, no moment change, no row step count, no weight
// decay — and mask_gradient drops the other rows from a SparseRowGrad.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "pkm/sparse_grad.hpp"
#include "pkm/types.hpp"

namespace pkm {

class RowMask {
 public:
  RowMask() = default;
  /// Allows `rows` (any order, duplicates merged) of a table of `table_rows` rows. Throws
  /// std::invalid_argument for table_rows < 1 and std::out_of_range for a row outside the
  /// table.
  RowMask(Index table_rows, std::vector<std::int64_t> rows)
      : table_rows_(table_rows), rows_(std::move(rows)) {
    if (table_rows < 1) {
      throw std::invalid_argument("pkm::RowMask: table_rows = " + std::to_string(table_rows) +
                                  ", expected a table of at least 1 row");
    }
    std::sort(rows_.begin(), rows_.end());
    rows_.erase(std::unique(rows_.begin(), rows_.end()), rows_.end());
    if (!rows_.empty() && (rows_.front() < 0 || rows_.back() >= table_rows)) {
      const std::int64_t r = rows_.front() < 0 ? rows_.front() : rows_.back();
      throw std::out_of_range("pkm::RowMask: row " + std::to_string(r) +
                              " is outside the table of " + std::to_string(table_rows) + " rows");
    }
  }

  /// Rows of the table the mask is for (0 for a default-constructed mask, which no table takes).
  Index table_rows() const { return table_rows_; }
  /// The allowed rows, sorted and unique.
  const std::vector<std::int64_t>& rows() const { return rows_; }
  Index size() const { return static_cast<Index>(rows_.size()); }
  bool allows(std::int64_t row) const {
    return std::binary_search(rows_.begin(), rows_.end(), row);
  }

  /// Throws std::invalid_argument unless the mask was made for a table of `table_rows` rows.
  void check_table(const char* who, Index table_rows) const {
    if (table_rows_ != table_rows) {
      throw std::invalid_argument(
          std::string(who) + ": the row mask is for a table of " + std::to_string(table_rows_) +
          " rows, expected one for this table of " + std::to_string(table_rows) + " rows");
    }
  }

  /// The positions u of `sorted_rows` (sorted, unique) whose row the mask allows, in order.
  /// One merge pass over both lists.
  std::vector<Index> allowed_positions(const std::vector<std::int64_t>& sorted_rows) const {
    std::vector<Index> keep;
    std::size_t m = 0;
    for (std::size_t u = 0; u < sorted_rows.size(); ++u) {
      while (m < rows_.size() && rows_[m] < sorted_rows[u]) ++m;
      if (m == rows_.size()) break;
      if (rows_[m] == sorted_rows[u]) keep.push_back(static_cast<Index>(u));
    }
    return keep;
  }

 private:
  Index table_rows_ = 0;
  std::vector<std::int64_t> rows_;
};

/// Drops from `grad` every row the mask does not allow. The gradient is validated first (and
/// the mask checked against `table_rows`); on error it is unchanged.
template <class Scalar>
void mask_gradient(SparseRowGrad<Scalar>& grad, const RowMask& mask, Index table_rows) {
  const char* who = "pkm::mask_gradient";
  mask.check_table(who, table_rows);
  grad.validate(who, "the gradient", table_rows);
  const std::vector<Index> keep = mask.allowed_positions(grad.rows);
  if (static_cast<Index>(keep.size()) == grad.size()) return;
  SparseRowGrad<Scalar> out;
  out.dim = grad.dim;
  out.rows.reserve(keep.size());
  out.values.resize(static_cast<Index>(keep.size()), grad.dim);
  for (std::size_t i = 0; i < keep.size(); ++i) {
    out.rows.push_back(grad.rows[static_cast<std::size_t>(keep[i])]);
    out.values.row(static_cast<Index>(i)) = grad.values.row(keep[i]);
  }
  grad = std::move(out);
}

}  // namespace pkm
