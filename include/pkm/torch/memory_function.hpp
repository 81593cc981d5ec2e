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

#include <array>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <variant>

#include "pkm/detail/aligned_buffer.hpp"
#include "pkm/detail/layer_core.hpp"
#include "pkm/memory_layer.hpp"
#include "pkm/optim/lazy_adam.hpp"
#include "pkm/optim/rowwise_adagrad.hpp"

namespace pkm::torch_ops {

/// What the tensors' shapes cannot tell: heads, knn and qk-norm (scale <= 0: sqrt(k_dim / 2)).
struct LayerOptions {
  std::int64_t heads = 1;
  std::int64_t knn = 32;
  bool qk_norm = false;
  double qk_norm_scale = 0.0;
};

/// pkm's sparse optimizer for one value table, applied inside backward (the fused mode).
/// kind "adam" (lazy Adam) or "adagrad" (row-wise Adagrad). Holds the optimizer state.
class ValueOptimizer : public torch::CustomClassHolder {
 public:
  ValueOptimizer(const std::string& kind, std::int64_t rows, std::int64_t dim, double lr, double max_grad_norm,
                 double weight_decay, double beta1, double beta2, double eps)
      : opt_(make(kind, rows, dim, lr, max_grad_norm, weight_decay, beta1, beta2, eps)) {}

  std::int64_t steps() const {
    return std::visit([](const auto& o) { return o.steps(); }, opt_);
  }
  void set_lr(double lr) {
    std::visit([&](auto& o) { o.set_lr(lr); }, opt_);
  }
  /// The value gradient's norm (before clipping) of the last fused backward.
  double last_norm() const { return last_norm_; }

  /// last_norm = fn(the optimizer), fn being a fused backward that steps it.
  template <class F>
  double apply(F&& fn) {
    last_norm_ = std::visit([&](auto& o) -> double { return fn(o); }, opt_);
    return last_norm_;
  }

 private:
  using Variant = std::variant<optim::LazyAdam<float>, optim::RowWiseAdagrad<float>>;
  static Variant make(const std::string& kind, std::int64_t rows, std::int64_t dim, double lr, double max_grad_norm,
                      double weight_decay, double beta1, double beta2, double eps) {
    if (kind == "adam") {
      optim::AdamOptions o;
      o.lr = lr;
      o.max_grad_norm = max_grad_norm;
      o.weight_decay = weight_decay;
      o.beta1 = beta1;
      o.beta2 = beta2;
      o.eps = eps;
      return optim::LazyAdam<float>(rows, dim, o);
    }
    if (kind == "adagrad") {
      optim::RowWiseAdagradOptions o;
      o.lr = lr;
      o.max_grad_norm = max_grad_norm;
      o.weight_decay = weight_decay;
      o.eps = eps;
      return optim::RowWiseAdagrad<float>(rows, dim, o);
    }
    throw std::invalid_argument("pkm ValueOptimizer: kind = '" + kind + "', expected 'adam' or 'adagrad'");
  }

  Variant opt_;
  double last_norm_ = 0.0;
};

namespace detail {

/// The parameter tensors in pkm::Tensor order (undefined where the config has none).
using ParamTensors = std::array<torch::Tensor, kNumTensors>;

[[noreturn]] inline void fail(const std::string& what) { throw std::invalid_argument("pkm.memory: " + what); }

inline std::string shape_of(const torch::Tensor& t) {
  std::string s = "(";
  for (std::int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + ")";
}

/// The config the tensors describe, each checked: CPU, contiguous, the dtype of x.
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
  if (o.qk_norm_scale > 0) c.qk_norm_scale = o.qk_norm_scale;
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
  c.query_bias = p[int(Tensor::query_bias)].defined();
  c.memory_plus = p[int(Tensor::swilu_weight)].defined();
  c.value_projection = p[int(Tensor::value_proj_weight)].defined();
  c.gating = p[int(Tensor::gate_weight)].defined();
  c.output_dim = c.value_projection ? p[int(Tensor::value_proj_weight)].size(0) : c.v_dim;
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
    if (p[t].numel() != s.rows * s.cols) {
      fail(std::string(tensor_name(Tensor(t))) + " has shape " + shape_of(p[t]) + ", expected " +
           std::to_string(s.rows) + (s.rank == 1 ? "" : " x " + std::to_string(s.cols)) + " elements");
    }
  }
  return c;
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

template <class T>
ValueTable<T> view_table(const torch::Tensor& values) {
  return ValueTable<T>::view(reinterpret_cast<T*>(values.data_ptr()), values.size(0), values.size(1), values.stride(0));
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
    const torch::Tensor x = x_in.contiguous();
    const MemoryConfig c = infer_config(x, p_in, values, o);
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
    ctx->saved_data["qk_norm_scale"] = o.qk_norm_scale;
    ctx->saved_data["sparse"] = sparse_grad;
    ctx->saved_data["in_sizes"] = x_in.sizes();
    if (opt) ctx->saved_data[kOptimizer] = c10::IValue::make_capsule(opt);
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
    o.qk_norm_scale = ctx->saved_data["qk_norm_scale"].toDouble();
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
    const bool fused = ctx->saved_data.count(kOptimizer) > 0;
    dispatch(x2, values, [&](auto s, auto t) {
      using S = decltype(s);
      using T = decltype(t);
      auto* holder = static_cast<CacheHolder<S>*>(cache_capsule.get());
      MemoryLayer<S, T> layer(view_params<S>(c, p), view_table<T>(values));
      LayerParameters<S> dparams = view_params<S>(c, dp);
      const MatrixMap<S> xm(const_cast<S*>(x2.data_ptr<S>()), x2.size(0), c.input_dim);
      const MatrixMap<S> doutm(const_cast<S*>(dout.data_ptr<S>()), dout.size(0), c.output_dim);
      MatrixMap<S> dxm(dx.data_ptr<S>(), dx.size(0), c.input_dim);
      if (fused) {
        if constexpr (std::is_same_v<S, float>) {
          auto opt = c10::static_intrusive_pointer_cast<ValueOptimizer>(ctx->saved_data[kOptimizer].toCapsule());
          opt->apply([&](auto& o2) { return layer.backward_fused(xm, holder->cache, doutm, dparams, o2, dxm); });
        } else {
          fail("the fused mode (a ValueOptimizer) needs float32 parameters");
        }
        return 0;
      }
      // The layer's backward (pkm/detail/layer_core.hpp) with the table gradient's rows
      // reduced straight into a huge-page buffer that the returned tensor then owns: no copy,
      // and no 4 KiB page faults over hundreds of MiB of fresh gradient rows.
      const char* who = "pkm.memory (backward)";
      MatrixRef<S> dx_ref(dxm);
      pkm::detail::check_backward<S>(who, layer.params(), xm, holder->cache, doutm, dparams, &dx_ref);
      const ForwardCache<S>& cache = holder->cache;
      const Index B = cache.batch;
      std::int64_t U = 0;
      torch::Tensor rows, vals;
      LayerWorkspace<S>& ws = pkm::detail::backward_begin<S>(layer.params(), cache, doutm);
      if (B > 0) {
        pkm::detail::bag_backward_begin<T, S>(who, layer.values(), cache.indices, cache.weights, ws.dy, ws.dscore,
                                              ws.bag);
        const auto& seg = ws.bag.segments;
        U = seg.size();
        auto* buffer = new pkm::detail::AlignedBuffer<S>(static_cast<std::size_t>(std::max<std::int64_t>(U, 1) * c.v_dim));
        const RowMatrix<S>& dy = ws.dy;
        auto source = [&](std::int64_t token, std::int64_t) { return dy.row(token).data(); };
        pkm::detail::parallel_blocks(U, pkm::detail::kSegmentBlock, [&](Index b0, Index b1) {
          for (Index u = b0; u < b1; ++u) {
            pkm::detail::reduce_segment(ws.bag.items, seg, u, c.v_dim, source, buffer->data() + u * c.v_dim);
          }
        });
        vals = torch::from_blob(buffer->data(), {U, c.v_dim}, [buffer](void*) { delete buffer; }, x2.options());
        rows = torch::empty({1, U}, torch::kLong);
        std::copy(seg.rows.begin(), seg.rows.end(), rows.data_ptr<std::int64_t>());
        pkm::detail::backward_end<S>(layer.params(), xm, cache, doutm, dparams, &dx_ref);
      } else {
        rows = torch::empty({1, 0}, torch::kLong);
        vals = torch::empty({0, c.v_dim}, x2.options());
      }
      vals = vals.to(values.scalar_type());
      if (sparse) {
        dvalues = torch::sparse_coo_tensor(rows, vals, {c.slots(), c.v_dim})._coalesced_(true);
      } else {
        dvalues = torch::zeros({c.slots(), c.v_dim}, values.options()).index_copy_(0, rows[0], vals);
      }
      return 0;
    });
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
