// pkm/torch/value_optimizer.hpp — pkm's sparse optimizer for one value table inside PyTorch
// (torch.classes.pkm.ValueOptimizer): the fused mode's lazy Adam / row-wise Adagrad, when its
// step happens, gradient accumulation, and its state for state_dict and pickles.
//
// Target pkm::torch (built when CMake finds Torch).
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <variant>
#include <vector>

#include "pkm/optim/lazy_adam.hpp"
#include "pkm/optim/rowwise_adagrad.hpp"
#include "pkm/optim/state.hpp"
#include "pkm/row_accumulator.hpp"
#include "pkm/sparse_grad.hpp"
#include "pkm/value_table.hpp"

namespace pkm::torch_ops {

namespace detail {

[[noreturn]] inline void fail(const std::string& what) {
  throw std::invalid_argument("pkm.memory: " + what);
}

inline std::string shape_of(const torch::Tensor& t) {
  std::string s = "(";
  for (std::int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + ")";
}

template <class T>
ValueTable<T> view_table(const torch::Tensor& values) {
  return ValueTable<T>::view(reinterpret_cast<T*>(values.data_ptr()), values.size(0),
                             values.size(1), values.stride(0));
}

class GraphToken;
}  // namespace detail

/// pkm's sparse optimizer for one value table, applied inside backward (the fused mode).
/// kind "adam" (lazy Adam) or "adagrad" (row-wise Adagrad). Holds the optimizer state.
///
/// When the update happens. Every gradient a backward computes is taken against the table as
/// the forwards saw it: the update waits until every graph still alive that read the table
/// through this optimizer has run its backward (a layer called twice in one loss: both
/// backwards, then one step of their summed gradient), and is applied at the latest by the
/// next forward or by step(). With one use per backward — the usual case — the step runs
/// fused into that backward and no gradient rows are stored. With `accumulate`, backwards only
/// add their gradient rows (gradient accumulation over micro-batches) and step() applies them.
class ValueOptimizer : public torch::CustomClassHolder {
 public:
  ValueOptimizer(const std::string& kind, std::int64_t rows, std::int64_t dim, double lr,
                 double max_grad_norm, double weight_decay, double beta1, double beta2, double eps,
                 bool accumulate = false)
      : kind_(kind),
        options_{lr, max_grad_norm, weight_decay, beta1, beta2, eps},
        accumulate_(accumulate),
        opt_(make(kind, rows, dim, options_)),
        acc_(rows, dim) {}

  const std::string& kind() const { return kind_; }
  /// {lr, max_grad_norm, weight_decay, beta1, beta2, eps}, as constructed (lr as last set).
  std::vector<double> options() const { return options_; }
  bool accumulates() const { return accumulate_; }
  std::int64_t rows() const { return rows_of(); }
  std::int64_t dim() const { return acc_.dim(); }
  std::int64_t steps() const {
    return std::visit([](const auto& o) { return o.steps(); }, opt_);
  }
  void set_lr(double lr) {
    std::lock_guard<std::mutex> lock(mutex_);
    std::visit([&](auto& o) { o.set_lr(lr); }, opt_);
    options_[0] = lr;
  }
  /// The value gradient's norm (before clipping) of the last step taken.
  double last_norm() const { return last_norm_; }
  /// Rows of the gradient accumulated and not yet applied.
  std::int64_t pending_rows() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return acc_.touched();
  }
  /// Applies the accumulated gradient to `table` now, if there is one; returns the norm of the
  /// last step taken. A step's error (a non-finite gradient) leaves the table unchanged and
  /// drops the accumulated gradient.
  double step(const torch::Tensor& table) {
    std::lock_guard<std::mutex> lock(mutex_);
    apply_locked(table);
    return last_norm_;
  }
  /// Drops the accumulated gradient (the accumulate mode's zero_grad).
  void zero_grad() {
    std::lock_guard<std::mutex> lock(mutex_);
    acc_.clear();
  }

  /// The state tensors (copies): the optimizer's ("step", "row_step", "exp_avg", "exp_avg_sq"
  /// for adam; "step", "sum" for adagrad) and the accumulated gradient ("pending_rows",
  /// "pending_values").
  c10::Dict<std::string, torch::Tensor> state() {
    std::lock_guard<std::mutex> lock(mutex_);
    c10::Dict<std::string, torch::Tensor> out;
    for_each_state([&](const std::string& name, const std::vector<std::int64_t>& shape, auto* data,
                       optim::StateKind) {
      using T = std::remove_pointer_t<decltype(data)>;
      const auto dtype = std::is_floating_point_v<T> ? torch::kFloat : torch::kLong;
      out.insert(name, torch::from_blob(data, shape, torch::TensorOptions().dtype(dtype)).clone());
    });
    const SparseRowGrad<float> pending = acc_.gradient();
    out.insert("pending_rows", torch::tensor(pending.rows, torch::kLong).reshape({pending.size()}));
    out.insert("pending_values", torch::from_blob(const_cast<float*>(pending.values.data()),
                                                  {pending.size(), pending.dim}, torch::kFloat)
                                     .clone());
    return out;
  }
  /// Loads state() of an optimizer of the same kind and table shape. Every tensor is checked
  /// first (present, no unknown name, shape, dtype, values as pkm's optimizer-state loader
  /// requires: step counts >= 0, row counts <= the step count, moments finite, second moments
  /// >= 0; pending rows sorted, unique, inside the table): on error std::invalid_argument and
  /// nothing changes.
  void load_state(const c10::Dict<std::string, torch::Tensor>& in) {
    std::lock_guard<std::mutex> lock(mutex_);
    const std::string who = "pkm ValueOptimizer.load_state";
    auto bad = [&](const std::string& what) { throw std::invalid_argument(who + ": " + what); };
    std::vector<std::string> known{"pending_rows", "pending_values"};
    std::int64_t step = -1;
    for_each_state([&](const std::string& name, const std::vector<std::int64_t>& shape, auto* data,
                       optim::StateKind kind) {
      using T = std::remove_pointer_t<decltype(data)>;
      known.push_back(name);
      if (!in.contains(name))
        bad("tensor '" + name + "' is missing; expected the state of a '" + kind_ + "' optimizer");
      const torch::Tensor t = in.at(name);
      const auto dtype = std::is_floating_point_v<T> ? torch::kFloat : torch::kLong;
      if (t.scalar_type() != dtype || t.sizes().vec() != shape) {
        bad("tensor '" + name + "' is " + std::string(c10::toString(t.scalar_type())) + " " +
            detail::shape_of(t) + ", expected " + c10::toString(dtype) + " of " +
            std::to_string(shape.size()) + " dimensions as the optimizer's");
      }
      const torch::Tensor c = t.contiguous();
      const T* v = c.data_ptr<T>();
      for (std::int64_t i = 0; i < c.numel(); ++i) {
        if (!optim::state_value_ok(kind, v[i], step)) {
          bad("tensor '" + name + "' holds " + std::to_string(v[i]) + " at element " +
              std::to_string(i) + "; expected " + optim::state_kind_rule(kind) +
              " (the optimizer is unchanged)");
        }
        if constexpr (!std::is_floating_point_v<T>) {
          if (name == "step") step = static_cast<std::int64_t>(v[i]);
        }
      }
    });
    for (const auto& item : in) {
      if (std::find(known.begin(), known.end(), item.key()) == known.end()) {
        bad("unknown tensor '" + item.key() + "' for a '" + kind_ + "' optimizer");
      }
    }
    SparseRowGrad<float> pending;
    pending.dim = acc_.dim();
    if (in.contains("pending_rows") || in.contains("pending_values")) {
      if (!in.contains("pending_rows") || !in.contains("pending_values"))
        bad("pending_rows and pending_values come together");
      const torch::Tensor r = in.at("pending_rows").contiguous(),
                          v = in.at("pending_values").contiguous();
      if (r.scalar_type() != torch::kLong || r.dim() != 1 || v.scalar_type() != torch::kFloat ||
          v.dim() != 2 || v.size(0) != r.size(0) || v.size(1) != acc_.dim()) {
        bad("pending_rows " + detail::shape_of(r) + " and pending_values " + detail::shape_of(v) +
            ", expected int64 (U) and float32 (U, " + std::to_string(acc_.dim()) + ")");
      }
      pending.rows.assign(r.data_ptr<std::int64_t>(), r.data_ptr<std::int64_t>() + r.numel());
      pending.values =
          Eigen::Map<const RowMatrix<float>>(v.data_ptr<float>(), v.size(0), v.size(1));
      pending.validate(who.c_str(), "pending_rows", rows_of());
      if (!pending.values.allFinite()) bad("pending_values holds a non-finite value");
    }
    for_each_state([&](const std::string& name, const std::vector<std::int64_t>&, auto* data,
                       optim::StateKind) {
      using T = std::remove_pointer_t<decltype(data)>;
      const torch::Tensor c = in.at(name).contiguous();
      std::memcpy(data, c.data_ptr<T>(), static_cast<std::size_t>(c.numel()) * sizeof(T));
    });
    acc_.clear();
    acc_.add(pending);
  }

  /// What pickling keeps (torch.save, copy.deepcopy): kind, table shape, options, the mode and
  /// state().
  using Pickled = std::tuple<std::string, std::int64_t, std::int64_t, std::vector<double>, bool,
                             c10::Dict<std::string, torch::Tensor>>;
  Pickled pickle() { return {kind_, rows_of(), acc_.dim(), options_, accumulate_, state()}; }
  static c10::intrusive_ptr<ValueOptimizer> unpickle(Pickled p) {
    const auto& o = std::get<3>(p);
    if (o.size() != 6)
      throw std::invalid_argument("pkm ValueOptimizer: a pickled state with " +
                                  std::to_string(o.size()) + " options, expected 6");
    auto opt =
        c10::make_intrusive<ValueOptimizer>(std::get<0>(p), std::get<1>(p), std::get<2>(p), o[0],
                                            o[1], o[2], o[3], o[4], o[5], std::get<4>(p));
    opt->load_state(std::get<5>(p));
    return opt;
  }

  // ---- for the operator (pkm.memory's forward and backward) -------------------------------

  /// What a backward does with the table's gradient.
  struct Plan {
    bool fused_now = false;    ///< step fused into this backward (nothing stored)
    bool apply_after = false;  ///< add this backward's gradient, then apply the sum
  };
  /// Before a forward reads `table`: a gradient left waiting (a graph that read the table is
  /// alive without having run its backward) is applied now, so no forward reads a table with
  /// an update pending.
  void before_forward(const torch::Tensor& table) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!accumulate_) apply_locked(table);
  }
  Plan begin_backward(bool& token_done) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!token_done) {
      token_done = true;
      ++done_;
    }
    Plan p;
    p.apply_after = !accumulate_ && done_ >= live_;
    p.fused_now = p.apply_after && acc_.empty();
    return p;
  }
  /// Adds one backward's gradient rows: row ids[u]'s gradient written by reduce(u, out).
  template <class Reduce>
  void accumulate(const std::vector<std::int64_t>& ids, Reduce&& reduce) {
    std::lock_guard<std::mutex> lock(mutex_);
    acc_.add_rows(ids, reduce);
  }
  /// last_norm = fn(the optimizer), fn being a fused backward that steps it.
  template <class F>
  double apply(F&& fn) {
    std::lock_guard<std::mutex> lock(mutex_);
    last_norm_ = std::visit([&](auto& o) -> double { return fn(o); }, opt_);
    return last_norm_;
  }

 private:
  friend class detail::GraphToken;
  using Variant = std::variant<optim::LazyAdam<float>, optim::RowWiseAdagrad<float>>;
  static Variant make(const std::string& kind, std::int64_t rows, std::int64_t dim,
                      const std::vector<double>& v) {
    if (kind == "adam") {
      optim::AdamOptions o;
      o.lr = v[0], o.max_grad_norm = v[1], o.weight_decay = v[2], o.beta1 = v[3], o.beta2 = v[4],
      o.eps = v[5];
      return optim::LazyAdam<float>(rows, dim, o);
    }
    if (kind == "adagrad") {
      optim::RowWiseAdagradOptions o;
      o.lr = v[0], o.max_grad_norm = v[1], o.weight_decay = v[2], o.eps = v[5];
      return optim::RowWiseAdagrad<float>(rows, dim, o);
    }
    throw std::invalid_argument("pkm ValueOptimizer: kind = '" + kind +
                                "', expected 'adam' or 'adagrad'");
  }
  std::int64_t rows_of() const {
    return std::visit([](const auto& o) { return o.rows(); }, opt_);
  }
  template <class F>
  void for_each_state(F&& fn) {
    std::visit(
        [&](auto& o) {
          o.for_each_state([&](const std::string& name, const std::vector<std::int64_t>& shape,
                               auto* data, optim::StateKind kind) { fn(name, shape, data, kind); });
        },
        opt_);
  }
  void apply_locked(const torch::Tensor& table) {
    if (acc_.empty()) return;
    try {
      if (table.scalar_type() == torch::kFloat) {
        ValueTable<float> t = detail::view_table<float>(table);
        last_norm_ = std::visit([&](auto& o) -> double { return acc_.step(o, t); }, opt_);
      } else if (table.scalar_type() == torch::kBFloat16) {
        ValueTable<bf16> t = detail::view_table<bf16>(table);
        last_norm_ = std::visit([&](auto& o) -> double { return acc_.step(o, t); }, opt_);
      } else {
        detail::fail(std::string("the fused optimizer's table is ") +
                     c10::toString(table.scalar_type()) + "; expected float32 or bfloat16");
      }
    } catch (...) {
      acc_.clear();  // a refused step changes nothing; its gradient is not retried forever
      throw;
    }
    acc_.clear();
  }
  void graph_born() {
    std::lock_guard<std::mutex> lock(mutex_);
    ++live_;
  }
  void graph_gone(bool done) {
    std::lock_guard<std::mutex> lock(mutex_);
    --live_;
    if (done) --done_;
  }

  std::string kind_;
  std::vector<double> options_;
  bool accumulate_ = false;
  Variant opt_;
  double last_norm_ = 0.0;
  mutable std::mutex mutex_;
  std::int64_t live_ = 0,
               done_ = 0;      // graphs alive that read through this optimizer; of them, backwarded
  RowAccumulator<float> acc_;  // the gradient accumulated and not yet applied
};

namespace detail {

/// One forward's share in its optimizer's bookkeeping: made by a fused forward, kept in its
/// autograd context, gone with the graph (after its backward, or when its output is dropped).
class GraphToken : public torch::CustomClassHolder {
 public:
  explicit GraphToken(c10::intrusive_ptr<ValueOptimizer> opt) : opt_(std::move(opt)) {
    opt_->graph_born();
  }
  ~GraphToken() override { opt_->graph_gone(done_); }
  GraphToken(const GraphToken&) = delete;
  GraphToken& operator=(const GraphToken&) = delete;
  ValueOptimizer::Plan begin_backward() { return opt_->begin_backward(done_); }

 private:
  c10::intrusive_ptr<ValueOptimizer> opt_;
  bool done_ = false;
};

}  // namespace detail

}  // namespace pkm::torch_ops
