// pkm/optim/rowwise_adagrad.hpp — row-wise Adagrad for a value table, the rule of FBGEMM's
// fused sparse Adagrad: one accumulator per row (4 bytes per row of state instead of Adam's
// two moments per element). For an updated row r with gradient g (clipped, plus
// weight_decay * w when L2 decay is on):
//   h[r] <- h[r] + mean(g^2);   w <- w - lr g / (sqrt(h[r]) + eps)
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "pkm/optim/grad_clip.hpp"
#include "pkm/optim/sparse_optimizer.hpp"

namespace pkm::optim {

struct RowWiseAdagradOptions {
  double lr = 1e-2;
  double eps = 1e-8;
  double initial_accumulator = 0.0;  ///< h[r] before the first update
  double weight_decay = 0.0;         ///< L2: g <- g + weight_decay * w (FBGEMM's L2 mode)
  double max_grad_norm = 0.0;        ///< clip the gradient's global norm to this; 0: off

  /// Every field, in declaration order (compared between the processes of a memory-parallel
  /// group before each step).
  auto fields() const {
    return std::tie(lr, eps, initial_accumulator, weight_decay, max_grad_norm);
  }

  void validate(const char* who) const {
    detail::check_step_options(who, lr, weight_decay, max_grad_norm);
    detail::check_eps(who, eps);
    detail::check_option(who, "initial_accumulator", initial_accumulator, 0.0, HUGE_VAL, false,
                         "a finite initial_accumulator >= 0");
  }
};

template <class S = float>
class RowWiseAdagrad : public SparseRowOptimizer<RowWiseAdagrad<S>, S, RowWiseAdagradOptions> {
  using Base = SparseRowOptimizer<RowWiseAdagrad<S>, S, RowWiseAdagradOptions>;

 public:
  RowWiseAdagrad(Index rows, Index dim, const RowWiseAdagradOptions& options = {})
      : Base("pkm::optim::RowWiseAdagrad", rows, dim, options) {
    sum_.assign(static_cast<std::size_t>(rows), static_cast<S>(options.initial_accumulator));
  }
  template <class T>
  RowWiseAdagrad(const ValueTable<T>& table, const RowWiseAdagradOptions& options = {})
      : RowWiseAdagrad(table.rows(), table.dim(), options) {}

  /// The accumulator of row r.
  S accumulator(Index r) const { return sum_.at(static_cast<std::size_t>(r)); }

  /// State: "step" (int64 [1]) and "sum" (S, [rows]), FBGEMM's momentum1.
  template <class F>
  void for_each_state(F&& fn) {
    fn(std::string("step"), std::vector<std::int64_t>{1}, &this->step_count(),
       StateKind::step_count);
    fn(std::string("sum"), std::vector<std::int64_t>{this->rows()}, sum_.data(),
       StateKind::non_negative);
  }

  /// Updates table row r (see SparseRowOptimizer).
  template <class T>
  void update_row(std::int64_t r, T* w, const S* g, S grad_scale) {
    update_row(r, w, g, grad_scale, row_statistic(w, g, grad_scale), this->dim());
  }

  /// Over column shards (pkm/distributed), the accumulator grows by the mean of g^2 over the
  /// whole row: its sum over the group's columns, `sq`, divided by the row's full width.
  static constexpr bool kRowStatistic = true;
  template <class T>
  S row_statistic(const T* w, const S* g, S grad_scale) const {
    const S wd = static_cast<S>(this->options().weight_decay);
    S sq = S(0);
    for (Index d = 0; d < this->dim(); ++d) {
      const S gd = grad_scale * g[d] + wd * static_cast<S>(w[d]);
      sq += gd * gd;
    }
    return sq;
  }
  template <class T>
  void update_row(std::int64_t r, T* w, const S* g, S grad_scale, S sq, Index full_dim) {
    const Index dim = this->dim();
    const RowWiseAdagradOptions& o = this->options();
    const S wd = static_cast<S>(o.weight_decay);
    S& h = sum_[static_cast<std::size_t>(r)];
    h += sq / static_cast<S>(full_dim);
    const S step = static_cast<S>(o.lr) / (std::sqrt(h) + static_cast<S>(o.eps));
    for (Index d = 0; d < dim; ++d) {
      const S wv = static_cast<S>(w[d]);
      const S gd = grad_scale * g[d] + wd * wv;
      w[d] = static_cast<T>(wv - step * gd);
    }
  }

 private:
  std::vector<S> sum_;
};

}  // namespace pkm::optim
