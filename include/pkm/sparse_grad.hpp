// pkm/sparse_grad.hpp — a sparse gradient of a table: sorted unique row ids and one summed
// gradient row for each. This is how pkm returns the value gradient (never a dense table).
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "pkm/types.hpp"

namespace pkm {

template <class Scalar>
struct SparseRowGrad {
  Index dim = 0;                   ///< width of a row
  std::vector<std::int64_t> rows;  ///< sorted, unique row ids of the table
  RowMatrix<Scalar> values;        ///< rows.size() x dim; values.row(u) is the gradient of rows[u]

  Index size() const { return static_cast<Index>(rows.size()); }
  bool empty() const { return rows.empty(); }
  void clear() {
    rows.clear();
    values.resize(0, dim);
  }

  /// Adds `other` in place: union of rows, rows present in both summed (this + other).
  void merge(const SparseRowGrad& other) {
    if (other.empty()) return;
    if (empty()) {
      *this = other;
      return;
    }
    if (other.dim != dim) {
      throw std::invalid_argument("pkm::SparseRowGrad::merge: other.dim = " +
                                  std::to_string(other.dim) + ", expected dim = " +
                                  std::to_string(dim));
    }
    std::vector<std::int64_t> merged;
    merged.reserve(rows.size() + other.rows.size());
    std::set_union(rows.begin(), rows.end(), other.rows.begin(), other.rows.end(),
                   std::back_inserter(merged));
    RowMatrix<Scalar> out = RowMatrix<Scalar>::Zero(static_cast<Index>(merged.size()), dim);
    std::size_t a = 0, b = 0;
    for (std::size_t u = 0; u < merged.size(); ++u) {
      if (a < rows.size() && rows[a] == merged[u]) out.row(u) += values.row(a++);
      if (b < other.rows.size() && other.rows[b] == merged[u]) out.row(u) += other.values.row(b++);
    }
    rows = std::move(merged);
    values = std::move(out);
  }

  /// dense.row(rows[u]) += scale * values.row(u). For tests and for dense optimizers.
  void add_to(MatrixRef<Scalar> dense, Scalar scale = Scalar(1)) const {
    if (dense.cols() != dim) {
      throw std::invalid_argument("pkm::SparseRowGrad::add_to: dense has " +
                                  std::to_string(dense.cols()) + " columns, expected dim = " +
                                  std::to_string(dim));
    }
    for (std::size_t u = 0; u < rows.size(); ++u) {
      if (rows[u] < 0 || rows[u] >= dense.rows()) {
        throw std::out_of_range("pkm::SparseRowGrad::add_to: row id " + std::to_string(rows[u]) +
                                " is outside the dense table of " + std::to_string(dense.rows()) +
                                " rows");
      }
    }
    for (std::size_t u = 0; u < rows.size(); ++u) dense.row(rows[u]) += scale * values.row(u);
  }
};

}  // namespace pkm
