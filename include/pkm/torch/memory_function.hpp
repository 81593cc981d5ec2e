// pkm/torch/memory_function.hpp — pkm's memory layer as a differentiable libtorch function:
// forward and backward run pkm's kernels on the tensors' own memory (no copy of the value
// table or of any parameter), autograd fills every parameter's gradient and the input's.
// The value table's gradient is a sparse COO tensor (as nn.Embedding(sparse=True) gives, for
// torch.optim.SparseAdam) or dense, or it is not formed at all: with a ValueOptimizer the
// table is updated inside backward by pkm's lazy Adam / row-wise Adagrad (the fused mode).
//
// Target pkm::torch (built when CMake finds Torch); the rest of pkm never needs libtorch.
// Python: pkm/torch/register.hpp registers this as torch.ops.pkm.memory (python/pkm_torch.py).
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <variant>
#include <vector>

#include "pkm/detail/aligned_buffer.hpp"
#include "pkm/detail/layer_core.hpp"
#include "pkm/memory_layer.hpp"
#include "pkm/optim/lazy_adam.hpp"
#include "pkm/optim/rowwise_adagrad.hpp"
#include "pkm/optim/state.hpp"
#include "pkm/row_accumulator.hpp"
#include "pkm/sparse_grad.hpp"

namespace pkm::torch_ops {

/// What the tensors' shapes cannot tell: heads, knn and qk-norm (scale unset: sqrt(k_dim / 2);
/// set: checked as MemoryConfig checks it, so NaN or -3 is refused, never ignored).
struct LayerOptions {
  std::int64_t heads = 1;
  std::int64_t knn = 32;
  bool qk_norm = false;
  std::optional<double> qk_norm_scale;
};

namespace detail {

[[noreturn]] inline void fail(const std::string& what) { throw std::invalid_argument("pkm.memory: " + what); }

inline std::string shape_of(const torch::Tensor& t) {
  std::string s = "(";
  for (std::int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + ")";
}

template <class T>
ValueTable<T> view_table(const torch::Tensor& values) {
  return ValueTable<T>::view(reinterpret_cast<T*>(values.data_ptr()), values.size(0), values.size(1), values.stride(0));
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
  ValueOptimizer(const std::string& kind, std::int64_t rows, std::int64_t dim, double lr, double max_grad_norm,
                 double weight_decay, double beta1, double beta2, double eps, bool accumulate = false)
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
    for_each_state([&](const std::string& name, const std::vector<std::int64_t>& shape, auto* data, optim::StateKind) {
      using T = std::remove_pointer_t<decltype(data)>;
      const auto dtype = std::is_floating_point_v<T> ? torch::kFloat : torch::kLong;
      out.insert(name, torch::from_blob(data, shape, torch::TensorOptions().dtype(dtype)).clone());
    });
    const SparseRowGrad<float> pending = acc_.gradient();
    out.insert("pending_rows", torch::tensor(pending.rows, torch::kLong).reshape({pending.size()}));
    out.insert("pending_values", torch::from_blob(const_cast<float*>(pending.values.data()), {pending.size(), pending.dim},
                                                  torch::kFloat).clone());
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
    for_each_state([&](const std::string& name, const std::vector<std::int64_t>& shape, auto* data, optim::StateKind kind) {
      using T = std::remove_pointer_t<decltype(data)>;
      known.push_back(name);
      if (!in.contains(name)) bad("tensor '" + name + "' is missing; expected the state of a '" + kind_ + "' optimizer");
      const torch::Tensor t = in.at(name);
      const auto dtype = std::is_floating_point_v<T> ? torch::kFloat : torch::kLong;
      if (t.scalar_type() != dtype || t.sizes().vec() != shape) {
        bad("tensor '" + name + "' is " + std::string(c10::toString(t.scalar_type())) + " " + detail::shape_of(t) +
            ", expected " + c10::toString(dtype) + " of " + std::to_string(shape.size()) + " dimensions as the optimizer's");
      }
      const torch::Tensor c = t.contiguous();
      const T* v = c.data_ptr<T>();
      for (std::int64_t i = 0; i < c.numel(); ++i) {
        if (!optim::state_value_ok(kind, v[i], step)) {
          bad("tensor '" + name + "' holds " + std::to_string(v[i]) + " at element " + std::to_string(i) + "; expected " +
              optim::state_kind_rule(kind) + " (the optimizer is unchanged)");
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
      if (!in.contains("pending_rows") || !in.contains("pending_values")) bad("pending_rows and pending_values come together");
      const torch::Tensor r = in.at("pending_rows").contiguous(), v = in.at("pending_values").contiguous();
      if (r.scalar_type() != torch::kLong || r.dim() != 1 || v.scalar_type() != torch::kFloat || v.dim() != 2 ||
          v.size(0) != r.size(0) || v.size(1) != acc_.dim()) {
        bad("pending_rows " + detail::shape_of(r) + " and pending_values " + detail::shape_of(v) +
            ", expected int64 (U) and float32 (U, " + std::to_string(acc_.dim()) + ")");
      }
      pending.rows.assign(r.data_ptr<std::int64_t>(), r.data_ptr<std::int64_t>() + r.numel());
      pending.values = Eigen::Map<const RowMatrix<float>>(v.data_ptr<float>(), v.size(0), v.size(1));
      pending.validate(who.c_str(), "pending_rows", rows_of());
      if (!pending.values.allFinite()) bad("pending_values holds a non-finite value");
    }
    for_each_state([&](const std::string& name, const std::vector<std::int64_t>&, auto* data, optim::StateKind) {
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
    if (o.size() != 6) throw std::invalid_argument("pkm ValueOptimizer: a pickled state with " + std::to_string(o.size()) + " options, expected 6");
    auto opt = c10::make_intrusive<ValueOptimizer>(std::get<0>(p), std::get<1>(p), std::get<2>(p), o[0], o[1], o[2], o[3],
                                                   o[4], o[5], std::get<4>(p));
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
  static Variant make(const std::string& kind, std::int64_t rows, std::int64_t dim, const std::vector<double>& v) {
    if (kind == "adam") {
      optim::AdamOptions o;
      o.lr = v[0], o.max_grad_norm = v[1], o.weight_decay = v[2], o.beta1 = v[3], o.beta2 = v[4], o.eps = v[5];
      return optim::LazyAdam<float>(rows, dim, o);
    }
    if (kind == "adagrad") {
      optim::RowWiseAdagradOptions o;
      o.lr = v[0], o.max_grad_norm = v[1], o.weight_decay = v[2], o.eps = v[5];
      return optim::RowWiseAdagrad<float>(rows, dim, o);
    }
    throw std::invalid_argument("pkm ValueOptimizer: kind = '" + kind + "', expected 'adam' or 'adagrad'");
  }
  std::int64_t rows_of() const {
    return std::visit([](const auto& o) { return o.rows(); }, opt_);
  }
  template <class F>
  void for_each_state(F&& fn) {
    std::visit([&](auto& o) {
      o.for_each_state([&](const std::string& name, const std::vector<std::int64_t>& shape, auto* data,
                           optim::StateKind kind) { fn(name, shape, data, kind); });
    }, opt_);
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
        detail::fail(std::string("the fused optimizer's table is ") + c10::toString(table.scalar_type()) +
                     "; expected float32 or bfloat16");
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
  std::int64_t live_ = 0, done_ = 0;  // graphs alive that read through this optimizer; of them, backwarded
  RowAccumulator<float> acc_;         // the gradient accumulated and not yet applied
};

namespace detail {

/// One forward's share in its optimizer's bookkeeping: made by a fused forward, kept in its
/// autograd context, gone with the graph (after its backward, or when its output is dropped).
class GraphToken : public torch::CustomClassHolder {
 public:
  explicit GraphToken(c10::intrusive_ptr<ValueOptimizer> opt) : opt_(std::move(opt)) { opt_->graph_born(); }
  ~GraphToken() override { opt_->graph_gone(done_); }
  GraphToken(const GraphToken&) = delete;
  GraphToken& operator=(const GraphToken&) = delete;
  ValueOptimizer::Plan begin_backward() { return opt_->begin_backward(done_); }

 private:
  c10::intrusive_ptr<ValueOptimizer> opt_;
  bool done_ = false;
};

/// The parameter tensors in pkm::Tensor order (undefined where the config has none).
using ParamTensors = std::array<torch::Tensor, kNumTensors>;

/// The config the tensors describe, each checked: CPU, contiguous, the dtype of x, and the
/// full shape the config gives it.
inline MemoryConfig infer_config(const torch::Tensor& x, const ParamTensors& p, const torch::Tensor& values,
                                 const LayerOptions& o) {
  auto check = [&](const torch::Tensor& t, const char* name) {
    if (!t.defined()) return;
    if (!t.device().is_cpu()) fail(std::string(name) + " is on " + t.device().str() + "; pkm's torch ops run on the CPU");
    if (!t.is_contiguous()) fail(std::string(name) + " is not contiguous; pass .contiguous()");
    if (t.scalar_type() != x.scalar_type()) {
      fail(std::string(name) + " is " + std::string(c10::toString(t.scalar_type())) + ", expected x's dtype " +
           c10::toString(x.scalar_type()));
    }
  };
  if (!x.device().is_cpu()) fail("x is on " + x.device().str() + "; pkm's torch ops run on the CPU");
  if (x.scalar_type() != torch::kFloat && x.scalar_type() != torch::kDouble) {
    fail(std::string("x is ") + c10::toString(x.scalar_type()) + "; expected float32 (or float64 for gradcheck)");
  }
  for (int t = 0; t < kNumTensors; ++t) check(p[t], tensor_name(Tensor(t)));
  if (!values.device().is_cpu()) fail("values is on " + values.device().str() + "; pkm's torch ops run on the CPU");
  if (x.dim() < 1) fail("x is a scalar; expected (..., input_dim)");
  if (!p[0].defined() || p[0].dim() != 2) fail("keys must be a 2-d tensor (2 heads n_keys, k_dim / 2)");
  if (!p[1].defined() || p[1].dim() != 2) fail("query weight must be a 2-d tensor (heads k_dim, input_dim)");
  if (values.dim() != 2 || values.stride(1) != 1) fail("values must be a 2-d tensor with unit column stride, got " + shape_of(values));
  MemoryConfig c;
  c.heads = o.heads;
  c.knn = o.knn;
  c.qk_norm = o.qk_norm;
  c.qk_norm_scale = o.qk_norm_scale;
  if (c.heads < 1 || p[0].size(0) % (2 * c.heads) != 0) {
    fail("keys has " + std::to_string(p[0].size(0)) + " rows, expected 2 heads n_keys with heads = " + std::to_string(c.heads));
  }
  c.n_keys = p[0].size(0) / (2 * c.heads);
  c.k_dim = 2 * p[0].size(1);
  c.input_dim = p[1].size(1);
  if (x.size(-1) != c.input_dim) {
    fail("x has " + std::to_string(x.size(-1)) + " columns, expected input_dim = " + std::to_string(c.input_dim) +
         " (the query weight's columns)");
  }
  c.v_dim = values.size(1);
  const torch::Tensor& w2 = p[int(Tensor::value_proj_weight)];
  if (w2.defined() && w2.dim() != 2) {
    fail(std::string(tensor_name(Tensor::value_proj_weight)) + " has shape " + shape_of(w2) + ", expected (output_dim, " +
         std::to_string(c.v_dim) + ")");
  }
  c.query_bias = p[int(Tensor::query_bias)].defined();
  c.memory_plus = p[int(Tensor::swilu_weight)].defined();
  c.value_projection = p[int(Tensor::value_proj_weight)].defined();
  c.gating = p[int(Tensor::gate_weight)].defined();
  c.output_dim = c.value_projection ? w2.size(0) : c.v_dim;
  c.validate();
  if (values.size(0) != c.slots()) {
    fail("values has " + std::to_string(values.size(0)) + " rows, expected n_keys^2 = " + std::to_string(c.slots()));
  }
  for (int t = 0; t < kNumTensors; ++t) {
    const TensorShape s = tensor_shape(c, Tensor(t));
    if (s.present != p[t].defined()) {
      fail(std::string(tensor_name(Tensor(t))) + (s.present ? " is missing" : " is given but the layer has no such tensor"));
    }
    if (!s.present) continue;
    // The whole shape, not the element count: a transposed weight has the right count and
    // would be read in the wrong layout.
    const bool same = p[t].dim() == s.rank && p[t].size(0) == s.rows && (s.rank == 1 || p[t].size(1) == s.cols);
    if (!same) {
      fail(std::string(tensor_name(Tensor(t))) + " has shape " + shape_of(p[t]) + ", expected (" + std::to_string(s.rows) +
           (s.rank == 1 ? "" : ", " + std::to_string(s.cols)) + ")");
    }
  }
  return c;
}

/// Validates a layer's config as MemoryConfig does (the PyTorch module's constructor calls it:
/// one validation, one message for C++ and Python).
inline void check_config(std::int64_t input_dim, std::int64_t output_dim, std::int64_t n_keys, std::int64_t heads,
                         std::int64_t knn, std::int64_t k_dim, std::int64_t v_dim, bool memory_plus,
                         bool value_projection, bool gating, bool query_bias, bool qk_norm,
                         std::optional<double> qk_norm_scale) {
  MemoryConfig c;
  c.input_dim = input_dim, c.output_dim = output_dim, c.n_keys = n_keys, c.heads = heads, c.knn = knn;
  c.k_dim = k_dim, c.v_dim = v_dim, c.memory_plus = memory_plus, c.value_projection = value_projection;
  c.gating = gating, c.query_bias = query_bias, c.qk_norm = qk_norm, c.qk_norm_scale = qk_norm_scale;
  c.validate();
}

template <class S>
LayerParameters<S> view_params(const MemoryConfig& c, const ParamTensors& p) {
  auto ptr = [&](Tensor t) { return p[int(t)].defined() ? p[int(t)].template data_ptr<S>() : nullptr; };
  ParameterBuffers<S> b;
  b.keys = ptr(Tensor::keys);
  b.query_weight = ptr(Tensor::query_weight);
  b.query_bias = ptr(Tensor::query_bias);
  b.swilu_weight = ptr(Tensor::swilu_weight);
  b.swilu_bias = ptr(Tensor::swilu_bias);
  b.value_proj_weight = ptr(Tensor::value_proj_weight);
  b.value_proj_bias = ptr(Tensor::value_proj_bias);
  b.gate_weight = ptr(Tensor::gate_weight);
  b.gate_bias = ptr(Tensor::gate_bias);
  return LayerParameters<S>::view(c, b);
}

template <class S>
struct CacheHolder : torch::CustomClassHolder {
  ForwardCache<S> cache;
};

/// Calls fn(S{}, T{}) with the layer's parameter type S and table type T.
template <class F>
auto dispatch(const torch::Tensor& x, const torch::Tensor& values, F&& fn) {
  const auto xs = x.scalar_type(), vs = values.scalar_type();
  if (xs == torch::kFloat && vs == torch::kFloat) return fn(float{}, float{});
  if (xs == torch::kFloat && vs == torch::kBFloat16) return fn(float{}, bf16{});
  if (xs == torch::kDouble && vs == torch::kDouble) return fn(double{}, double{});
  fail(std::string("x is ") + c10::toString(xs) + " and values " + c10::toString(vs) +
       "; expected float32 with a float32 or bfloat16 table, or float64 with float64 (for gradcheck)");
}

/// ctx->saved_data keys.
inline constexpr const char* kCache = "pkm_cache";
inline constexpr const char* kOptimizer = "pkm_optimizer";
inline constexpr const char* kToken = "pkm_graph";

/// A tensor owning `pages` (its memory is handed over, freed with the tensor).
template <class S>
torch::Tensor tensor_of(pkm::detail::PageBuffer<S>& pages, std::vector<std::int64_t> shape, const torch::TensorOptions& o) {
  const std::size_t bytes = pages.bytes();
  S* data = pages.release();
  return torch::from_blob(data, shape, [bytes](void* p) { pkm::detail::PageBuffer<S>::free_pages(p, bytes); }, o);
}

class MemoryFunction : public torch::autograd::Function<MemoryFunction> {
 public:
  // The tensors one by one (autograd tracks tensor arguments only), the optional ones as
  // optionals (an undefined tensor may not be an autograd input).
  using Opt = c10::optional<torch::Tensor>;
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x_in,
                               const torch::Tensor& keys, const torch::Tensor& wq, const Opt& bq, const Opt& w1,
                               const Opt& b1, const Opt& w2, const Opt& b2, const Opt& wg, const Opt& bg,
                               const torch::Tensor& values, const LayerOptions& o, bool sparse_grad,
                               const c10::intrusive_ptr<ValueOptimizer>& opt) {
    auto t = [](const Opt& v) { return v ? *v : torch::Tensor(); };
    const ParamTensors p_in{keys, wq, t(bq), t(w1), t(b1), t(w2), t(b2), t(wg), t(bg)};
    if (!x_in.device().is_cpu()) fail("x is on " + x_in.device().str() + "; pkm's torch ops run on the CPU");
    const torch::Tensor x = x_in.contiguous();
    const MemoryConfig c = infer_config(x, p_in, values, o);
    if (opt) opt->before_forward(values);  // no forward reads a table with an update pending
    const torch::Tensor x2 = x.reshape({-1, c.input_dim});
    torch::Tensor out = torch::empty({x2.size(0), c.output_dim}, x.options());
    auto holder = dispatch(x, values, [&](auto s, auto t) -> c10::intrusive_ptr<torch::CustomClassHolder> {
      using S = decltype(s);
      using T = decltype(t);
      auto h = c10::make_intrusive<CacheHolder<S>>();
      const MemoryLayer<S, T> layer(view_params<S>(c, p_in), view_table<T>(values));
      layer.forward(MatrixMap<S>(x2.data_ptr<S>(), x2.size(0), c.input_dim),
                    MatrixMap<S>(out.data_ptr<S>(), out.size(0), c.output_dim), h->cache);
      return h;
    });
    std::vector<torch::Tensor> saved{x2, values};
    for (const auto& t : p_in) saved.push_back(t.defined() ? t : torch::Tensor());
    ctx->save_for_backward(saved);
    ctx->saved_data[kCache] = c10::IValue::make_capsule(holder);
    ctx->saved_data["heads"] = o.heads;
    ctx->saved_data["knn"] = o.knn;
    ctx->saved_data["qk_norm"] = o.qk_norm;
    ctx->saved_data["qk_norm_scale"] = o.qk_norm_scale ? c10::IValue(*o.qk_norm_scale) : c10::IValue();
    ctx->saved_data["sparse"] = sparse_grad;
    ctx->saved_data["in_sizes"] = x_in.sizes();
    if (opt) {
      ctx->saved_data[kOptimizer] = c10::IValue::make_capsule(opt);
      ctx->saved_data[kToken] = c10::IValue::make_capsule(c10::make_intrusive<GraphToken>(opt));
    }
    std::vector<std::int64_t> out_sizes(x_in.sizes().begin(), x_in.sizes().end() - 1);
    out_sizes.push_back(c.output_dim);
    return out.view(out_sizes);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor& x2 = saved[0];
    const torch::Tensor& values = saved[1];
    ParamTensors p;
    for (int t = 0; t < kNumTensors; ++t) p[t] = saved[2 + t];
    LayerOptions o;
    o.heads = ctx->saved_data["heads"].toInt();
    o.knn = ctx->saved_data["knn"].toInt();
    o.qk_norm = ctx->saved_data["qk_norm"].toBool();
    if (!ctx->saved_data["qk_norm_scale"].isNone()) o.qk_norm_scale = ctx->saved_data["qk_norm_scale"].toDouble();
    const bool sparse = ctx->saved_data["sparse"].toBool();
    const MemoryConfig c = infer_config(x2, p, values, o);
    const torch::Tensor dout = grads[0].contiguous().reshape({-1, c.output_dim}).to(x2.scalar_type());
    torch::Tensor dx = torch::empty_like(x2);
    ParamTensors dp;
    for (int t = 0; t < kNumTensors; ++t) {
      if (p[t].defined()) dp[t] = torch::zeros_like(p[t]);
    }
    torch::Tensor dvalues;
    const auto cache_capsule = ctx->saved_data[kCache].toCapsule();
    // The fused mode: the optimizer says whether this backward steps now (fused, nothing
    // stored), or adds its gradient to the one waiting for the layer's other uses.
    c10::intrusive_ptr<ValueOptimizer> opt;
    ValueOptimizer::Plan plan;
    if (ctx->saved_data.count(kOptimizer) > 0) {
      opt = c10::static_intrusive_pointer_cast<ValueOptimizer>(ctx->saved_data[kOptimizer].toCapsule());
      plan = static_cast<GraphToken*>(ctx->saved_data[kToken].toCapsule().get())->begin_backward();
    }
    dispatch(x2, values, [&](auto s, auto t) {
      using S = decltype(s);
      using T = decltype(t);
      auto* holder = static_cast<CacheHolder<S>*>(cache_capsule.get());
      MemoryLayer<S, T> layer(view_params<S>(c, p), view_table<T>(values));
      LayerParameters<S> dparams = view_params<S>(c, dp);
      const MatrixMap<S> xm(const_cast<S*>(x2.data_ptr<S>()), x2.size(0), c.input_dim);
      const MatrixMap<S> doutm(const_cast<S*>(dout.data_ptr<S>()), dout.size(0), c.output_dim);
      MatrixMap<S> dxm(dx.data_ptr<S>(), dx.size(0), c.input_dim);
      if (opt && !std::is_same_v<S, float>) fail("the fused mode (a ValueOptimizer) needs float32 parameters");
      if (opt && plan.fused_now) {
        if constexpr (std::is_same_v<S, float>) {
          opt->apply([&](auto& o2) { return layer.backward_fused(xm, holder->cache, doutm, dparams, o2, dxm); });
        }
        return 0;
      }
      // The layer's backward (pkm/detail/layer_core.hpp) with the table gradient's rows
      // reduced straight into fresh pages that the returned tensor then owns: no copy, no
      // zeroing pass, and no 4 KiB page faults over hundreds of MiB of gradient.
      const char* who = "pkm.memory (backward)";
      MatrixRef<S> dx_ref(dxm);
      pkm::detail::check_backward<S>(who, layer.params(), xm, holder->cache, doutm, dparams, &dx_ref);
      const ForwardCache<S>& cache = holder->cache;
      LayerWorkspace<S>& ws = pkm::detail::backward_begin<S>(layer.params(), cache, doutm);
      const Index V = c.v_dim;
      std::int64_t U = 0;
      if (cache.batch > 0) {
        pkm::detail::bag_backward_begin<T, S>(who, layer.values(), cache.indices, cache.weights, ws.dy, ws.dscore,
                                              ws.bag);
        U = static_cast<std::int64_t>(ws.bag.segments.size());
      }
      const auto& seg = ws.bag.segments;
      const RowMatrix<S>& dy = ws.dy;
      auto source = [&](std::int64_t token, std::int64_t) { return dy.row(token).data(); };
      auto finish = [&] {  // the rest of the backward: output weights, search, query, dx
        if (cache.batch > 0) pkm::detail::backward_end<S>(layer.params(), xm, cache, doutm, dparams, &dx_ref);
      };
      // Row u of the gradient into `row_of(u)`.
      auto reduce_rows = [&](auto&& row_of) {
        pkm::detail::parallel_blocks(U, pkm::detail::kSegmentBlock, [&](Index b0, Index b1) {
          for (Index u = b0; u < b1; ++u) pkm::detail::reduce_segment(ws.bag.items, seg, u, V, source, row_of(u));
        });
      };
      if (opt) {  // the fused mode, adding to the gradient waiting for the layer's other uses
        if constexpr (std::is_same_v<S, float>) {
          if (U > 0) {
            opt->accumulate(seg.rows, [&](Index u, float* out) {
              pkm::detail::reduce_segment(ws.bag.items, seg, u, V, source, out);
            });
          }
          finish();
        }
        return 0;
      }
      if (!sparse && values.scalar_type() == x2.scalar_type()) {
        // The dense gradient: rows written in place, untouched rows the kernel's zero pages.
        pkm::detail::PageBuffer<S> dense(static_cast<std::size_t>(c.slots()) * static_cast<std::size_t>(V));
        S* d = dense.data();
        reduce_rows([&](Index u) { return d + seg.rows[static_cast<std::size_t>(u)] * V; });
        finish();
        dvalues = tensor_of(dense, {c.slots(), V}, x2.options());
        return 0;
      }
      pkm::detail::PageBuffer<S> rows_buffer(static_cast<std::size_t>(std::max<std::int64_t>(U, 1) * V));
      S* r = rows_buffer.data();
      reduce_rows([&](Index u) { return r + u * V; });
      finish();
      torch::Tensor vals = tensor_of(rows_buffer, {std::max<std::int64_t>(U, 1), V}, x2.options()).narrow(0, 0, U);
      torch::Tensor rows = torch::empty({1, U}, torch::kLong);
      if (U > 0) std::copy(seg.rows.begin(), seg.rows.end(), rows.data_ptr<std::int64_t>());
      vals = vals.to(values.scalar_type());
      if (sparse) {
        dvalues = torch::sparse_coo_tensor(rows, vals, {c.slots(), V})._coalesced_(true);
      } else {
        dvalues = torch::zeros({c.slots(), V}, values.options()).index_copy_(0, rows[0], vals);
      }
      return 0;
    });
    if (opt && plan.apply_after && !plan.fused_now) opt->step(values);
    const auto in_sizes = ctx->saved_data["in_sizes"].toIntVector();
    torch::autograd::variable_list out{dx.view(in_sizes)};
    for (int t = 0; t < kNumTensors; ++t) out.push_back(dp[t]);
    out.push_back(dvalues);
    out.push_back(torch::Tensor());  // options
    out.push_back(torch::Tensor());  // sparse flag
    out.push_back(torch::Tensor());  // optimizer
    return out;
  }
};

}  // namespace detail

/// out = the memory layer applied to x (..., input_dim) -> (..., output_dim), differentiable
/// in x and every tensor. Parameter tensors in the reference module's layout (nn.Linear
/// weights (out, in)); absent optional ones undefined. values: (n_keys^2, v_dim), float32 or
/// bfloat16 with float32 x and parameters (float64 throughout for gradcheck). sparse_grad:
/// the table's gradient as a sparse COO tensor (else dense). opt: update the table inside
/// backward with pkm's optimizer instead (its gradient is then None).
inline torch::Tensor memory(const torch::Tensor& x, const torch::Tensor& keys, const torch::Tensor& query_weight,
                            const torch::Tensor& query_bias, const torch::Tensor& swilu_weight,
                            const torch::Tensor& swilu_bias, const torch::Tensor& value_proj_weight,
                            const torch::Tensor& value_proj_bias, const torch::Tensor& gate_weight,
                            const torch::Tensor& gate_bias, const torch::Tensor& values, const LayerOptions& options,
                            bool sparse_grad = true, const c10::intrusive_ptr<ValueOptimizer>& opt = {}) {
  auto o = [](const torch::Tensor& t) { return t.defined() ? c10::optional<torch::Tensor>(t) : c10::nullopt; };
  return detail::MemoryFunction::apply(x, keys, query_weight, o(query_bias), o(swilu_weight), o(swilu_bias),
                                       o(value_proj_weight), o(value_proj_bias), o(gate_weight), o(gate_bias), values,
                                       options, sparse_grad, opt);
}

}  // namespace pkm::torch_ops
