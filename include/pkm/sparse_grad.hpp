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

  /// Throws unless this is a well-formed gradient: dim >= 0, values of rows.size() x dim,
  /// row ids sorted, unique, >= 0 (std::invalid_argument) and, when table_rows >= 0, below
  /// table_rows (std::out_of_range). `who` and `name` go into the message. Every function
  /// that takes a SparseRowGrad from outside checks it with this before reading it.
  void validate(const char* who, const char* name, Index table_rows = -1) const {
    auto fail = [&](const std::string& what) {
      throw std::invalid_argument(std::string(who) + ": " + name + " " + what +
                                  "; expected a SparseRowGrad as backward() makes it");
    };
    if (dim < 0) fail("has dim = " + std::to_string(dim));
    if (values.rows() != size() || (size() > 0 && values.cols() != dim)) {
      fail("has values of " + std::to_string(values.rows()) + " x " +
           std::to_string(values.cols()) + " for " + std::to_string(size()) + " row ids of dim " +
           std::to_string(dim));
    }
    for (std::size_t u = 0; u < rows.size(); ++u) {
      if (rows[u] < 0)
        fail("has row id " + std::to_string(rows[u]) + " at position " + std::to_string(u));
      if (u > 0 && rows[u] <= rows[u - 1]) {
        fail("has row ids that are not sorted and unique (" + std::to_string(rows[u - 1]) +
             " then " + std::to_string(rows[u]) + " at position " + std::to_string(u) + ")");
      }
    }
    if (table_rows >= 0 && !rows.empty() && rows.back() >= table_rows) {
      throw std::out_of_range(std::string(who) + ": " + name + " has row id " +
                              std::to_string(rows.back()) + ", outside the table of " +
                              std::to_string(table_rows) + " rows");
    }
  }

  /// Adds `other` in place: union of rows, rows present in both summed (this + other).
  /// Both are validated first; on error neither changes.
  void merge(const SparseRowGrad& other) {
    validate("pkm::SparseRowGrad::merge", "this gradient");
    other.validate("pkm::SparseRowGrad::merge", "other");
    if (other.empty()) return;
    if (empty()) {
      *this = other;
      return;
    }
    if (other.dim != dim) {
      throw std::invalid_argument(
          "pkm::SparseRowGrad::merge: other.dim = " + std::to_string(other.dim) +
          ", expected dim = " + std::to_string(dim));
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
                                  std::to_string(dense.cols()) +
                                  " columns, expected dim = " + std::to_string(dim));
    }
    validate("pkm::SparseRowGrad::add_to", "the gradient", dense.rows());
    for (std::size_t u = 0; u < rows.size(); ++u) dense.row(rows[u]) += scale * values.row(u);
  }
};

}  // namespace pkm
