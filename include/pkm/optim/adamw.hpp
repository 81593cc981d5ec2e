// pkm/optim/adamw.hpp — Adam with decoupled weight decay (AdamW) for the dense parameters,
// and the per-element Adam rule that the lazy sparse Adam (lazy_adam.hpp) shares.
//
// The rule is torch.optim.AdamW's (amsgrad off):
//   w <- w (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
//   w <- w - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// with g the (clipped) gradient and t the step count, counted from 1.
#pragma once

#include <algorithm>
#include <functional>
#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "pkm/detail/parallel.hpp"
#include "pkm/detail/vec_math.hpp"
#include "pkm/optim/grad_clip.hpp"
#include "pkm/optim/state.hpp"
#include "pkm/parameters.hpp"
#include "pkm/types.hpp"

namespace pkm::optim {

/// Hyper-parameters of Adam(W); also used by LazyAdam for the value table.
struct AdamOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;   ///< decoupled (AdamW): w <- w (1 - lr wd) each update
  double max_grad_norm = 0.0;  ///< clip the gradient's global norm to this; 0: no clipping

  /// Throws std::invalid_argument naming the first bad field.
  /// Every field, in declaration order (compared between the processes of a memory-parallel
  /// group before each step).
  auto fields() const { return std::tie(lr, beta1, beta2, eps, weight_decay, max_grad_norm); }

  void validate(const char* who) const {
    detail::check_step_options(who, lr, weight_decay, max_grad_norm);
    detail::check_option(who, "beta1", beta1, 0.0, 1.0, true, "0 <= beta1 < 1");
    detail::check_option(who, "beta2", beta2, 0.0, 1.0, true, "0 <= beta2 < 1");
    detail::check_eps(who, eps);
  }
};

namespace detail {

/// The coefficients of one Adam update at step t (t >= 1), in the state's type S.
template <class S>
struct AdamCoefficients {
  S decay, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, inv_sqrt_bc2, eps;
};

template <class S>
AdamCoefficients<S> adam_coefficients(const AdamOptions& o, double lr, double weight_decay,
                                      std::int64_t t) {
  const double bc1 = 1.0 - std::pow(o.beta1, static_cast<double>(t));
  const double bc2 = 1.0 - std::pow(o.beta2, static_cast<double>(t));
  return {S(1.0 - lr * weight_decay), S(o.beta1),       S(o.beta2),
          S(1.0 - o.beta1),           S(1.0 - o.beta2), S(lr / bc1),
          S(1.0 / std::sqrt(bc2)),    S(o.eps)};
}

/// One Adam update of n elements: parameters w (stored as T; computed in S), gradient
/// grad_scale * g, first and second moments m and v. Chunks of plain loops the compiler
/// vectorises around one packed square root (detail::sqrt_array): every element goes through
/// the same instructions wherever it sits in the array, so a row updated alone gets the same
/// bits as in a whole tensor.
template <class T, class S>
void adam_update(T* w, const S* g, S grad_scale, S* m, S* v, Index n,
                 const AdamCoefficients<S>& c) {
  constexpr Index kChunk = 256;
  alignas(64) S root[kChunk];
  for (Index i0 = 0; i0 < n; i0 += kChunk) {
    const Index len = std::min(kChunk, n - i0);
    S* mc = m + i0;
    S* vc = v + i0;
    const S* gc = g + i0;
    for (Index i = 0; i < len; ++i) {
      const S gs = gc[i] * grad_scale;
      mc[i] = c.beta1 * mc[i] + c.one_minus_beta1 * gs;
      vc[i] = c.beta2 * vc[i] + c.one_minus_beta2 * (gs * gs);
    }
    pkm::detail::sqrt_array(vc, root, len);
    T* wc = w + i0;
    for (Index i = 0; i < len; ++i) {
      const S wi = static_cast<S>(wc[i]) * c.decay -
                   c.step_size * mc[i] / (root[i] * c.inv_sqrt_bc2 + c.eps);
      wc[i] = static_cast<T>(wi);
    }
  }
}

}  // namespace detail

/// AdamW over a set of dense tensors registered with add(): the caller's parameter and
/// gradient buffers (kept by pointer: they must outlive the optimizer), and the optimizer's
/// own moment estimates. step() clips the global gradient norm (options().max_grad_norm)
/// and updates every tensor; deterministic under any thread count.
template <class S = float>
class AdamW {
  static_assert(std::is_floating_point_v<S>, "pkm::optim::AdamW: S must be float or double");

 public:
  using scalar_type = S;

  explicit AdamW(const AdamOptions& options = {}) : options_(options) {
    options_.validate("pkm::optim::AdamW");
  }

  const AdamOptions& options() const { return options_; }
  /// Changes the learning rate (for schedules); validated like the options.
  void set_lr(double lr) { options_ = detail::with_lr(options_, lr, "pkm::optim::AdamW::set_lr"); }
  std::int64_t steps() const { return step_; }
  Index num_tensors() const { return static_cast<Index>(slots_.size()); }
  /// Elements under optimization, over all tensors.
  Index num_parameters() const {
    Index n = 0;
    for (const auto& s : slots_) n += s.size;
    return n;
  }

  /// Registers `size` contiguous parameters and their gradient under a unique name (the
  /// prefix of its state tensors). weight_decay overrides the option for this tensor (e.g.
  /// 0 for biases and norms).
  void add(const std::string& name, S* param, S* grad, Index size,
           std::optional<double> weight_decay = std::nullopt) {
    const char* who = "pkm::optim::AdamW::add";
    if (name.empty()) throw std::invalid_argument(std::string(who) + ": the tensor name is empty");
    for (const auto& s : slots_) {
      if (s.name == name) {
        throw std::invalid_argument(std::string(who) + ": a tensor named '" + name +
                                    "' is already registered; names must be unique");
      }
    }
    if (size < 0 || (size > 0 && (param == nullptr || grad == nullptr))) {
      throw std::invalid_argument(std::string(who) + ": tensor '" + name + "' has size " +
                                  std::to_string(size) + " and a null " +
                                  (param == nullptr ? "parameter" : "gradient") +
                                  " pointer; expected size >= 0 and non-null buffers");
    }
    const double wd = weight_decay.value_or(options_.weight_decay);
    detail::check_option(who, "weight_decay", wd, 0.0, HUGE_VAL, false,
                         "a finite weight_decay >= 0");
    Slot s;
    s.name = name;
    s.param = param;
    s.grad = grad;
    s.size = size;
    s.weight_decay = wd;
    s.m.assign(static_cast<std::size_t>(size), S(0));
    s.v.assign(static_cast<std::size_t>(size), S(0));
    slots_.push_back(std::move(s));
  }
  /// Registers an Eigen matrix or vector of any storage order — an owning Matrix, or a Map,
  /// Ref or Block over contiguous memory — and its gradient of the same shape and order
  /// (AdamW is element-wise, so the order does not matter otherwise). For an owning matrix,
  /// step() and zero_grad() check that it still holds the buffer registered: one that was
  /// move-assigned or resized since (`g = Matrix(...)`) throws std::runtime_error instead of
  /// touching freed memory. Assign into it (`g.setZero()`, `g = expr`) to keep its buffer.
  template <class P, class G>
  void add(const std::string& name, Eigen::DenseBase<P>& param, Eigen::DenseBase<G>& grad,
           std::optional<double> weight_decay = std::nullopt) {
    static_assert(std::is_same_v<typename P::Scalar, S> && std::is_same_v<typename G::Scalar, S>,
                  "pkm::optim::AdamW::add: the parameter and its gradient must hold the "
                  "optimizer's scalar type S");
    static_assert(
        (int(P::Flags) & Eigen::DirectAccessBit) && (int(G::Flags) & Eigen::DirectAccessBit),
        "pkm::optim::AdamW::add: pass a matrix, Map, Ref or Block with storage (not an "
        "expression)");
    const char* who = "pkm::optim::AdamW::add";
    auto& p = param.derived();
    auto& g = grad.derived();
    if (g.rows() != p.rows() || g.cols() != p.cols()) {
      throw std::invalid_argument(std::string(who) + ": gradient of '" + name + "' is " +
                                  std::to_string(g.rows()) + " x " + std::to_string(g.cols()) +
                                  ", expected the parameter's " + std::to_string(p.rows()) + " x " +
                                  std::to_string(p.cols()));
    }
    auto contiguous = [](const auto& m) {
      return m.size() <= 1 ||
             (m.innerStride() == 1 && (m.outerSize() <= 1 || m.outerStride() == m.innerSize()));
    };
    const bool vectors = p.rows() == 1 || p.cols() == 1;
    if (!contiguous(p) || !contiguous(g) ||
        (!vectors && bool(P::IsRowMajor) != bool(G::IsRowMajor))) {
      throw std::invalid_argument(
          std::string(who) + ": '" + name +
          "' and its gradient must each be contiguous (no row or column stride) "
          "and in the same storage order");
    }
    add(name, p.data(), g.data(), p.size(), weight_decay);
    using PT = std::decay_t<decltype(p)>;
    using GT = std::decay_t<decltype(g)>;
    if constexpr (std::is_base_of_v<Eigen::PlainObjectBase<PT>, PT> ||
                  std::is_base_of_v<Eigen::PlainObjectBase<GT>, GT>) {
      slots_.back().moved = [&p, &g, pd = p.data(), gd = g.data(), n = p.size()] {
        return p.data() != pd || g.data() != gd || p.size() != n || g.size() != n;
      };
    }
  }
  /// Registers a std::vector and its gradient (same size); checked for reallocation like an
  /// owning matrix.
  void add(const std::string& name, std::vector<S>& param, std::vector<S>& grad,
           std::optional<double> weight_decay = std::nullopt) {
    if (grad.size() != param.size()) {
      throw std::invalid_argument(
          "pkm::optim::AdamW::add: gradient of '" + name + "' has " + std::to_string(grad.size()) +
          " elements, expected the parameter's " + std::to_string(param.size()));
    }
    add(name, param.data(), grad.data(), static_cast<Index>(param.size()), weight_decay);
    slots_.back().moved = [&param, &grad, pd = param.data(), gd = grad.data(), n = param.size()] {
      return param.data() != pd || grad.data() != gd || param.size() != n || grad.size() != n;
    };
  }
  /// Registers a row-major matrix view (a temporary Map or Ref) and its gradient.
  void add(const std::string& name, MatrixRef<S> param, MatrixRef<S> grad,
           std::optional<double> weight_decay = std::nullopt) {
    const char* who = "pkm::optim::AdamW::add";
    if (grad.rows() != param.rows() || grad.cols() != param.cols()) {
      throw std::invalid_argument(
          std::string(who) + ": gradient of '" + name + "' is " + std::to_string(grad.rows()) +
          " x " + std::to_string(grad.cols()) + ", expected the parameter's " +
          std::to_string(param.rows()) + " x " + std::to_string(param.cols()));
    }
    for (const auto* m : {&param, &grad}) {
      if (m->rows() > 1 && m->outerStride() != m->cols()) {
        throw std::invalid_argument(std::string(who) + ": '" + name + "' has row stride " +
                                    std::to_string(m->outerStride()) + ", expected a contiguous " +
                                    "matrix (stride = cols = " + std::to_string(m->cols()) + ")");
      }
    }
    add(name, param.data(), grad.data(), param.size(), weight_decay);
  }
  /// Registers every tensor of a memory layer's dense parameters, named prefix + the
  /// reference name (e.g. "layers.3.mem.query_proj.query_mlps.0.weight").
  void add(const std::string& prefix, LayerParameters<S>& params, LayerParameters<S>& grads,
           std::optional<double> weight_decay = std::nullopt) {
    check_parameters_match(grads, params.config(), "gradients passed to pkm::optim::AdamW::add");
    params.for_each([&](Tensor t, MatrixMap<S> p) {
      add(prefix + tensor_name(t), p.data(), grads.data(t), p.size(), weight_decay);
    });
    // step() writes through the registered pointers: it marks the parameters changed, so the
    // layer's forward checks them again.
    if (params.stamp()) stamps_.push_back(params.stamp());
  }

  /// Sets every registered gradient to zero.
  void zero_grad() {
    check_buffers("pkm::optim::AdamW::zero_grad");
    for (auto& s : slots_) std::fill(s.grad, s.grad + s.size, S(0));
  }

  /// One update of every registered tensor from its gradient. Returns the global gradient
  /// norm before clipping. A non-finite gradient throws std::runtime_error naming the tensor
  /// and changes nothing.
  double step() {
    detail::check_step_counter("pkm::optim::AdamW::step", step_);
    check_buffers("pkm::optim::AdamW::step");
    double sq = 0.0;
    for (const auto& s : slots_) sq += detail::sum_of_squares(s.grad, s.size);
    const double norm = std::sqrt(sq);
    if (!std::isfinite(norm)) throw_non_finite();
    const S scale = static_cast<S>(clip_coefficient(norm, options_.max_grad_norm));
    ++step_;
    for (auto& stamp : stamps_) stamp->touch();
    for (auto& s : slots_) {
      const auto c = detail::adam_coefficients<S>(options_, options_.lr, s.weight_decay, step_);
      pkm::detail::parallel_blocks(s.size, kBlock, [&](Index b, Index e) {
        detail::adam_update(s.param + b, s.grad + b, scale, s.m.data() + b, s.v.data() + b, e - b,
                            c);
      });
    }
    return norm;
  }

  /// Calls fn(name, shape, data, kind) for each state tensor: "step" (int64, shape [1]),
  /// "<tensor>.exp_avg" and "<tensor>.exp_avg_sq" (S, shape [size]).
  template <class F>
  void for_each_state(F&& fn) {
    fn(std::string("step"), std::vector<std::int64_t>{1}, &step_, StateKind::step_count);
    for (auto& s : slots_) {
      fn(s.name + ".exp_avg", std::vector<std::int64_t>{s.size}, s.m.data(), StateKind::finite);
      fn(s.name + ".exp_avg_sq", std::vector<std::int64_t>{s.size}, s.v.data(),
         StateKind::non_negative);
    }
  }

 private:
  static constexpr Index kBlock = 4096;

  std::vector<std::shared_ptr<pkm::detail::ModificationStamp>> stamps_;  ///< see add()

  struct Slot {
    std::string name;
    S* param = nullptr;
    S* grad = nullptr;
    Index size = 0;
    double weight_decay = 0.0;
    std::vector<S> m, v;
    std::function<bool()> moved;  ///< for owning containers: has the registered buffer gone?
  };

  /// Throws std::runtime_error, before anything is touched, if an owning matrix or vector
  /// registered with add() no longer holds the registered buffer.
  void check_buffers(const char* who) const {
    for (const auto& s : slots_) {
      if (s.moved && s.moved()) {
        throw std::runtime_error(
            std::string(who) + ": tensor '" + s.name +
            "' (or its gradient) was move-assigned or resized after add(), so its "
            "registered buffer is gone; assign into it instead (g.setZero(), g = expr) "
            "or register it in a new optimizer; nothing was updated");
      }
    }
  }

  [[noreturn]] void throw_non_finite() const {
    for (const auto& s : slots_) {
      for (Index i = 0; i < s.size; ++i) {
        if (!std::isfinite(s.grad[i])) {
          throw std::runtime_error("pkm::optim::AdamW::step: gradient of '" + s.name + "' holds " +
                                   std::to_string(s.grad[i]) + " at element " + std::to_string(i) +
                                   "; expected finite gradients (nothing was updated)");
        }
      }
    }
    throw std::runtime_error(
        "pkm::optim::AdamW::step: the gradient norm overflows; nothing was updated");
  }

  AdamOptions options_;
  std::vector<Slot> slots_;
  std::int64_t step_ = 0;
};

}  // namespace pkm::optim
