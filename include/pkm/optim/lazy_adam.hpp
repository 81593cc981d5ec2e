// pkm/optim/lazy_adam.hpp — lazy (sparse) Adam for a value table: only the rows in a step's
// gradient are updated, and each row keeps its own step count, so its bias correction is
// that of the steps it actually took part in. A row touched at every step follows dense
// AdamW exactly. State: two moments per element (2x the table in S) and one count per row.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "pkm/optim/adamw.hpp"
#include "pkm/optim/sparse_optimizer.hpp"

namespace pkm::optim {

template <class S = float>
class LazyAdam : public SparseRowOptimizer<LazyAdam<S>, S, AdamOptions> {
  using Base = SparseRowOptimizer<LazyAdam<S>, S, AdamOptions>;

 public:
  /// For a table of rows x dim. Weight decay, if any, is decoupled and applied to a row only
  /// when it is updated (lazily).
  LazyAdam(Index rows, Index dim, const AdamOptions& options = {})
      : Base("pkm::optim::LazyAdam", rows, dim, options) {
    m_ = RowMatrix<S>::Zero(rows, dim);
    v_ = RowMatrix<S>::Zero(rows, dim);
    row_step_.assign(static_cast<std::size_t>(rows), 0);
  }
  template <class T>
  LazyAdam(const ValueTable<T>& table, const AdamOptions& options = {})
      : LazyAdam(table.rows(), table.dim(), options) {}

  /// Updates row r has had.
  std::int64_t row_steps(Index r) const { return row_step_.at(static_cast<std::size_t>(r)); }

  /// State: "step" (int64 [1]), "row_step" (int64 [rows]), "exp_avg" and "exp_avg_sq"
  /// (S, [rows, dim]), with the values each may hold (pkm/optim/state.hpp).
  template <class F>
  void for_each_state(F&& fn) {
    fn(std::string("step"), std::vector<std::int64_t>{1}, &this->step_count(),
       StateKind::step_count);
    fn(std::string("row_step"), std::vector<std::int64_t>{this->rows()}, row_step_.data(),
       StateKind::row_count);
    fn(std::string("exp_avg"), std::vector<std::int64_t>{this->rows(), this->dim()}, m_.data(),
       StateKind::finite);
    fn(std::string("exp_avg_sq"), std::vector<std::int64_t>{this->rows(), this->dim()}, v_.data(),
       StateKind::non_negative);
  }

  /// Updates table row r (see SparseRowOptimizer).
  template <class T>
  void update_row(std::int64_t r, T* w, const S* g, S grad_scale) {
    const std::int64_t t = ++row_step_[static_cast<std::size_t>(r)];
    const AdamOptions& o = this->options();
    const auto c = detail::adam_coefficients<S>(o, o.lr, o.weight_decay, t);
    detail::adam_update(w, g, grad_scale, m_.row(r).data(), v_.row(r).data(), this->dim(), c);
  }

 private:
  RowMatrix<S> m_, v_;
  std::vector<std::int64_t> row_step_;
};

}  // namespace pkm::optim
