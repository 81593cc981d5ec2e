// pkm/optim/sparse_sgd.hpp — plain SGD for a value table: only the rows in a step's gradient
// change, w <- w - lr (g + weight_decay w), with no state but the step counter. Sparse memory
// finetuning (Lin et al., 2025) found it the best optimizer for the values of the slots it
// updates: Adam's per-row normalisation makes a rarely used row move as far as a busy one.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "pkm/optim/grad_clip.hpp"
#include "pkm/optim/sparse_optimizer.hpp"

namespace pkm::optim {

struct SgdOptions {
  double lr = 1.0;
  double weight_decay = 0.0;   ///< L2 on the updated rows only: g <- g + weight_decay * w
  double max_grad_norm = 0.0;  ///< clip the gradient's global norm to this; 0: off

  /// Every field, in declaration order (compared between the processes of a memory-parallel
  /// group before each step).
  auto fields() const { return std::tie(lr, weight_decay, max_grad_norm); }

  void validate(const char* who) const {
    detail::check_step_options(who, lr, weight_decay, max_grad_norm);
  }
};

template <class S = float>
class SparseSgd : public SparseRowOptimizer<SparseSgd<S>, S, SgdOptions> {
  using Base = SparseRowOptimizer<SparseSgd<S>, S, SgdOptions>;

 public:
  SparseSgd(Index rows, Index dim, const SgdOptions& options = {})
      : Base("pkm::optim::SparseSgd", rows, dim, options) {}
  template <class T>
  SparseSgd(const ValueTable<T>& table, const SgdOptions& options = {})
      : SparseSgd(table.rows(), table.dim(), options) {}

  /// State: "step" (int64 [1]).
  template <class F>
  void for_each_state(F&& fn) {
    fn(std::string("step"), std::vector<std::int64_t>{1}, &this->step_count(),
       StateKind::step_count);
  }

  /// Updates table row r (see SparseRowOptimizer).
  template <class T>
  void update_row(std::int64_t, T* w, const S* g, S grad_scale) {
    const S lr = static_cast<S>(this->options().lr),
            wd = static_cast<S>(this->options().weight_decay);
    for (Index d = 0; d < this->dim(); ++d) {
      const S wv = static_cast<S>(w[d]);
      w[d] = static_cast<T>(wv - lr * (grad_scale * g[d] + wd * wv));
    }
  }
};

}  // namespace pkm::optim
