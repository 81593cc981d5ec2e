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

#include <ATen/autocast_mode.h>
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

#include "pkm/memory_layer.hpp"
#include "pkm/page_buffer.hpp"
#include "pkm/value_gradient.hpp"
#include "pkm/torch/value_optimizer.hpp"

namespace pkm::torch_ops {

/// What the tensors' shapes cannot tell: heads, knn and qk-norm (scale unset: sqrt(k_dim / 2);
/// set: checked as MemoryConfig checks it, so NaN or -3 is refused, never ignored).
struct LayerOptions {
  std::int64_t heads = 1;
  std::int64_t knn = 32;
  bool qk_norm = false;
  std::optional<double> qk_norm_scale;
  /// Precision of the layer's products (MemoryConfig::compute). memory() also takes the bf16
  /// path under torch.autocast("cpu", dtype=torch.bfloat16) and for bfloat16 x.
  Dtype compute = Dtype::f32;
  /// The selected scores' weights (MemoryConfig::score_activation).
  ScoreActivation score_activation = ScoreActivation::softmax;
  /// Precision of the key search's half scores (MemoryConfig::score_compute).
  Dtype score_compute = Dtype::f32;
};

namespace detail {

/// The parameter tensors in pkm::Tensor order (undefined where the config has none).
using ParamTensors = std::array<torch::Tensor, kNumTensors>;

/// The config the tensors describe, each checked: CPU, contiguous, the dtype of x, and the
/// full shape the config gives it; the table has `rows` rows of `v_dim` values.
inline MemoryConfig infer_config(const torch::Tensor& x, const ParamTensors& p,
                                 std::int64_t rows, std::int64_t v_dim, const LayerOptions& o) {
  auto check = [&](const torch::Tensor& t, const char* name) {
    if (!t.defined()) return;
    if (!t.device().is_cpu())
      fail(std::string(name) + " is on " + t.device().str() + "; pkm's torch ops run on the CPU");
    if (!t.is_contiguous()) fail(std::string(name) + " is not contiguous; pass .contiguous()");
    if (t.scalar_type() != x.scalar_type()) {
      fail(std::string(name) + " is " + std::string(c10::toString(t.scalar_type())) +
           ", expected x's dtype " + c10::toString(x.scalar_type()));
    }
  };
  if (!x.device().is_cpu())
    fail("x is on " + x.device().str() + "; pkm's torch ops run on the CPU");
  if (x.scalar_type() != torch::kFloat && x.scalar_type() != torch::kDouble) {
    fail(std::string("x is ") + c10::toString(x.scalar_type()) +
         "; expected float32 (or float64 for gradcheck)");
  }
  for (int t = 0; t < kNumTensors; ++t) check(p[t], tensor_name(Tensor(t)));
  if (x.dim() < 1) fail("x is a scalar; expected (..., input_dim)");
  if (!p[0].defined() || p[0].dim() != 2)
    fail("keys must be a 2-d tensor (2 heads n_keys, k_dim / 2)");
  if (!p[1].defined() || p[1].dim() != 2)
    fail("query weight must be a 2-d tensor (heads k_dim, input_dim)");
  MemoryConfig c;
  c.heads = o.heads;
  c.knn = o.knn;
  c.qk_norm = o.qk_norm;
  c.qk_norm_scale = o.qk_norm_scale;
  c.compute = o.compute;
  c.score_activation = o.score_activation;
  c.score_compute = o.score_compute;
  if (c.heads < 1 || p[0].size(0) % (2 * c.heads) != 0) {
    fail("keys has " + std::to_string(p[0].size(0)) +
         " rows, expected 2 heads n_keys with heads = " + std::to_string(c.heads));
  }
  c.n_keys = p[0].size(0) / (2 * c.heads);
  c.k_dim = 2 * p[0].size(1);
  c.input_dim = p[1].size(1);
  if (x.size(-1) != c.input_dim) {
    fail("x has " + std::to_string(x.size(-1)) + " columns, expected input_dim = " +
         std::to_string(c.input_dim) + " (the query weight's columns)");
  }
  c.v_dim = v_dim;
  const torch::Tensor& w2 = p[int(Tensor::value_proj_weight)];
  if (w2.defined() && w2.dim() != 2) {
    fail(std::string(tensor_name(Tensor::value_proj_weight)) + " has shape " + shape_of(w2) +
         ", expected (output_dim, " + std::to_string(c.v_dim) + ")");
  }
  c.query_bias = p[int(Tensor::query_bias)].defined();
  c.memory_plus = p[int(Tensor::swilu_weight)].defined();
  c.value_projection = p[int(Tensor::value_proj_weight)].defined();
  c.gating = p[int(Tensor::gate_weight)].defined();
  c.output_dim = c.value_projection ? w2.size(0) : c.v_dim;
  c.validate();
  if (rows != c.slots()) {
    fail("values has " + std::to_string(rows) +
         " rows, expected n_keys^2 = " + std::to_string(c.slots()));
  }
  for (int t = 0; t < kNumTensors; ++t) {
    const TensorShape s = tensor_shape(c, Tensor(t));
    if (s.present != p[t].defined()) {
      fail(std::string(tensor_name(Tensor(t))) +
           (s.present ? " is missing" : " is given but the layer has no such tensor"));
    }
    if (!s.present) continue;
    // The whole shape, not the element count: a transposed weight has the right count and
    // would be read in the wrong layout.
    const bool same =
        p[t].dim() == s.rank && p[t].size(0) == s.rows && (s.rank == 1 || p[t].size(1) == s.cols);
    if (!same) {
      fail(std::string(tensor_name(Tensor(t))) + " has shape " + shape_of(p[t]) + ", expected (" +
           std::to_string(s.rows) + (s.rank == 1 ? "" : ", " + std::to_string(s.cols)) + ")");
    }
  }
  return c;
}

/// infer_config for a table of float elements `values`.
inline MemoryConfig infer_config(const torch::Tensor& x, const ParamTensors& p,
                                 const torch::Tensor& values, const LayerOptions& o) {
  if (!values.device().is_cpu())
    fail("values is on " + values.device().str() + "; pkm's torch ops run on the CPU");
  if (values.dim() != 2 || values.stride(1) != 1)
    fail("values must be a 2-d tensor with unit column stride, got " + shape_of(values));
  return infer_config(x, p, values.size(0), values.size(1), o);
}

/// Validates a layer's config as MemoryConfig does (the PyTorch module's constructor calls it:
/// one validation, one message for C++ and Python).
inline void check_config(std::int64_t input_dim, std::int64_t output_dim, std::int64_t n_keys,
                         std::int64_t heads, std::int64_t knn, std::int64_t k_dim,
                         std::int64_t v_dim, bool memory_plus, bool value_projection, bool gating,
                         bool query_bias, bool qk_norm, std::optional<double> qk_norm_scale,
                         ScoreActivation score_activation = ScoreActivation::softmax) {
  MemoryConfig c;
  c.input_dim = input_dim, c.output_dim = output_dim, c.n_keys = n_keys, c.heads = heads,
  c.knn = knn;
  c.k_dim = k_dim, c.v_dim = v_dim, c.memory_plus = memory_plus,
  c.value_projection = value_projection;
  c.gating = gating, c.query_bias = query_bias, c.qk_norm = qk_norm,
  c.qk_norm_scale = qk_norm_scale;
  c.score_activation = score_activation;
  c.validate();
}

template <class S>
LayerParameters<S> view_params(const MemoryConfig& c, const ParamTensors& p,
                               std::shared_ptr<pkm::detail::ModificationStamp> stamp = nullptr) {
  auto ptr = [&](Tensor t) {
    return p[int(t)].defined() ? p[int(t)].template data_ptr<S>() : nullptr;
  };
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
  return LayerParameters<S>::view(c, b, std::move(stamp));
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
       "; expected float32 with a float32 or bfloat16 table, or float64 with float64 (for "
       "gradcheck)");
}

/// ctx->saved_data keys.
inline constexpr const char* kCache = "pkm_cache";
inline constexpr const char* kOptimizer = "pkm_optimizer";
inline constexpr const char* kToken = "pkm_graph";

/// A tensor owning `pages` (its memory is handed over, freed with the tensor).
template <class S>
torch::Tensor tensor_of(PageBuffer<S>& pages, std::vector<std::int64_t> shape,
                        const torch::TensorOptions& o) {
  const std::size_t bytes = pages.bytes();
  S* data = pages.release();
  return torch::from_blob(
      data, shape, [bytes](void* p) { PageBuffer<S>::free_pages(p, bytes); }, o);
}

}  // namespace detail

/// What a module keeps between its inference calls (torch.classes.pkm.ForwardState): the
/// forward's cache, its buffers sized once, and the parameters' finiteness, checked once per
/// change of the tensors (their data pointers and autograd versions: in-place ops and
/// optimizer steps bump them; writes through `.data` do not). Used where no gradient flows
/// (grad mode off, or nothing requires grad); one caller at a time, and a second caller
/// meanwhile gets a fresh cache and check of its own.
struct ForwardState : torch::CustomClassHolder {
  std::mutex mutex;
  ForwardCache<float> cache;

  /// The stamp for the views of these tensors: the same one (already checked) when none of
  /// them changed since the last call, else a fresh one. Call with the mutex held.
  std::shared_ptr<pkm::detail::ModificationStamp> stamp_for(const detail::ParamTensors& p,
                                                            const MemoryConfig& c) {
    bool same = stamp_ != nullptr && c == config_;
    for (int t = 0; t < kNumTensors; ++t) {
      const void* ptr = p[t].defined() ? p[t].data_ptr() : nullptr;
      const std::int64_t version = p[t].defined() ? std::int64_t(p[t]._version()) : -1;
      same = same && ptr == ptrs_[t] && version == versions_[t];
      ptrs_[t] = ptr;
      versions_[t] = version;
    }
    if (!same) {
      stamp_ = std::make_shared<pkm::detail::ModificationStamp>();
      config_ = c;
    }
    return stamp_;
  }

 private:
  std::shared_ptr<pkm::detail::ModificationStamp> stamp_;
  MemoryConfig config_;
  std::array<const void*, kNumTensors> ptrs_{};
  std::array<std::int64_t, kNumTensors> versions_{};
};

namespace detail {

/// True when autograd would want a gradient from this call.
inline bool wants_grad(const torch::Tensor& x, const ParamTensors& p, const torch::Tensor& values) {
  if (!torch::GradMode::is_enabled()) return false;
  bool g = x.requires_grad() || (values.defined() && values.requires_grad());
  for (const auto& t : p) g = g || (t.defined() && t.requires_grad());
  return g;
}

/// The forward of `layer_of(params)` on x (float32) outside autograd, with `state`'s cache and
/// finiteness stamp where it is free (else a cache of this call's own).
template <class MakeLayer>
torch::Tensor stateful_forward(ForwardState& state, const torch::Tensor& x_in,
                               const ParamTensors& p, const MemoryConfig& c,
                               MakeLayer&& layer_of) {
  const torch::Tensor x = x_in.contiguous();
  const torch::Tensor x2 = x.reshape({-1, c.input_dim});
  torch::Tensor out = torch::empty({x2.size(0), c.output_dim}, x.options());
  std::unique_lock<std::mutex> lock(state.mutex, std::try_to_lock);
  ForwardCache<float> own;
  ForwardCache<float>& cache = lock.owns_lock() ? state.cache : own;
  const auto layer = layer_of(view_params<float>(c, p, lock.owns_lock() ? state.stamp_for(p, c)
                                                                          : nullptr));
  layer.forward(MatrixMap<float>(x2.data_ptr<float>(), x2.size(0), c.input_dim),
                MatrixMap<float>(out.data_ptr<float>(), out.size(0), c.output_dim), cache);
  std::vector<std::int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = c.output_dim;
  return out.reshape(shape);
}

class MemoryFunction : public torch::autograd::Function<MemoryFunction> {
 public:
  // The tensors one by one (autograd tracks tensor arguments only), the optional ones as
  // optionals (an undefined tensor may not be an autograd input).
  using Opt = c10::optional<torch::Tensor>;
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x_in,
                               const torch::Tensor& keys, const torch::Tensor& wq, const Opt& bq,
                               const Opt& w1, const Opt& b1, const Opt& w2, const Opt& b2,
                               const Opt& wg, const Opt& bg, const torch::Tensor& values,
                               const LayerOptions& o, bool sparse_grad,
                               const c10::intrusive_ptr<ValueOptimizer>& opt) {
    auto t = [](const Opt& v) { return v ? *v : torch::Tensor(); };
    const ParamTensors p_in{keys, wq, t(bq), t(w1), t(b1), t(w2), t(b2), t(wg), t(bg)};
    if (!x_in.device().is_cpu())
      fail("x is on " + x_in.device().str() + "; pkm's torch ops run on the CPU");
    const torch::Tensor x = x_in.contiguous();
    const MemoryConfig c = infer_config(x, p_in, values, o);
    if (opt) opt->before_forward(values);  // no forward reads a table with an update pending
    const torch::Tensor x2 = x.reshape({-1, c.input_dim});
    torch::Tensor out = torch::empty({x2.size(0), c.output_dim}, x.options());
    auto holder =
        dispatch(x, values, [&](auto s, auto t) -> c10::intrusive_ptr<torch::CustomClassHolder> {
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
    ctx->saved_data["qk_norm_scale"] =
        o.qk_norm_scale ? c10::IValue(*o.qk_norm_scale) : c10::IValue();
    ctx->saved_data["compute"] = static_cast<std::int64_t>(o.compute);
    ctx->saved_data["score_activation"] = static_cast<std::int64_t>(o.score_activation);
    ctx->saved_data["score_compute"] = static_cast<std::int64_t>(o.score_compute);
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
    if (!ctx->saved_data["qk_norm_scale"].isNone())
      o.qk_norm_scale = ctx->saved_data["qk_norm_scale"].toDouble();
    o.compute = static_cast<Dtype>(ctx->saved_data["compute"].toInt());
    o.score_activation =
        static_cast<ScoreActivation>(ctx->saved_data["score_activation"].toInt());
    o.score_compute = static_cast<Dtype>(ctx->saved_data["score_compute"].toInt());
    const bool sparse = ctx->saved_data["sparse"].toBool();
    const MemoryConfig c = infer_config(x2, p, values, o);
    const torch::Tensor dout =
        grads[0].contiguous().reshape({-1, c.output_dim}).to(x2.scalar_type());
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
      opt = c10::static_intrusive_pointer_cast<ValueOptimizer>(
          ctx->saved_data[kOptimizer].toCapsule());
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
      if (opt && !std::is_same_v<S, float>)
        fail("the fused mode (a ValueOptimizer) needs float32 parameters");
      if (opt && plan.fused_now) {
        if constexpr (std::is_same_v<S, float>) {
          opt->apply([&](auto& o2) {
            return layer.backward_fused(xm, holder->cache, doutm, dparams, o2, dxm);
          });
        }
        return 0;
      }
      // The layer's backward with the table gradient handed to a sink (pkm/value_gradient.hpp):
      // the rows go straight into fresh pages that the returned tensor then owns — no copy, no
      // zeroing pass, no 4 KiB page faults over hundreds of MiB — or into the optimizer's
      // accumulator.
      const ForwardCache<S>& cache = holder->cache;
      const Index V = c.v_dim;
      if (opt) {  // the fused mode, adding to the gradient waiting for the layer's other uses
        if constexpr (std::is_same_v<S, float>) {
          layer.backward_to(
              xm, cache, doutm, dparams,
              [&](const std::vector<std::int64_t>& rows, Index, auto&& reduce) {
                opt->accumulate(rows, reduce);
              },
              dxm);
        }
        return 0;
      }
      if (!sparse && values.scalar_type() == x2.scalar_type()) {
        // The dense gradient: rows written in place, untouched rows the kernel's zero pages.
        PageBuffer<S> dense(static_cast<std::size_t>(c.slots()) * static_cast<std::size_t>(V));
        S* d = dense.data();
        layer.backward_to(
            xm, cache, doutm, dparams,
            [&](const std::vector<std::int64_t>& rows, Index, auto&& reduce) {
              reduce_rows_into(rows, reduce,
                               [&](Index u) { return d + rows[static_cast<std::size_t>(u)] * V; });
            },
            dxm);
        dvalues = tensor_of(dense, {c.slots(), V}, x2.options());
        return 0;
      }
      torch::Tensor vals = torch::empty({0, V}, x2.options());
      torch::Tensor ids = torch::empty({1, 0}, torch::kLong);
      layer.backward_to(
          xm, cache, doutm, dparams,
          [&](const std::vector<std::int64_t>& rows, Index, auto&& reduce) {
            const auto U = static_cast<std::int64_t>(rows.size());
            PageBuffer<S> buffer(static_cast<std::size_t>(std::max<std::int64_t>(U, 1) * V));
            S* r = buffer.data();
            reduce_rows_into(rows, reduce, [&](Index u) { return r + u * V; });
            vals =
                tensor_of(buffer, {std::max<std::int64_t>(U, 1), V}, x2.options()).narrow(0, 0, U);
            ids = torch::empty({1, U}, torch::kLong);
            std::copy(rows.begin(), rows.end(), ids.data_ptr<std::int64_t>());
          },
          dxm);
      vals = vals.to(values.scalar_type());
      if (sparse) {
        dvalues = torch::sparse_coo_tensor(ids, vals, {c.slots(), V})._coalesced_(true);
      } else {
        dvalues = torch::zeros({c.slots(), V}, values.options()).index_copy_(0, ids[0], vals);
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
namespace detail {
/// True inside torch.autocast("cpu", dtype=torch.bfloat16) for a float32 x.
inline bool autocast_bf16(const torch::Tensor& x) {
  return at::autocast::is_cpu_enabled() &&
         at::autocast::get_autocast_cpu_dtype() == at::kBFloat16 &&
         x.scalar_type() == torch::kFloat;
}
}  // namespace detail

/// The products run in bf16 (options.compute = Dtype::bf16, pkm/gemm_bf16.hpp) where options
/// ask for it, inside torch.autocast("cpu", dtype=torch.bfloat16), or for a bfloat16 x with
/// float32 parameters (x is widened to float32, the result narrowed back to bfloat16, both
/// steps differentiable).
inline torch::Tensor memory(const torch::Tensor& x, const torch::Tensor& keys,
                            const torch::Tensor& query_weight, const torch::Tensor& query_bias,
                            const torch::Tensor& swilu_weight, const torch::Tensor& swilu_bias,
                            const torch::Tensor& value_proj_weight,
                            const torch::Tensor& value_proj_bias, const torch::Tensor& gate_weight,
                            const torch::Tensor& gate_bias, const torch::Tensor& values,
                            const LayerOptions& options, bool sparse_grad = true,
                            const c10::intrusive_ptr<ValueOptimizer>& opt = {},
                            const c10::intrusive_ptr<ForwardState>& state = {}) {
  auto o = [](const torch::Tensor& t) {
    return t.defined() ? c10::optional<torch::Tensor>(t) : c10::nullopt;
  };
  LayerOptions opts = options;
  const bool bf16_x = x.scalar_type() == torch::kBFloat16 && keys.scalar_type() == torch::kFloat;
  if (bf16_x || detail::autocast_bf16(x)) opts.compute = Dtype::bf16;
  const torch::Tensor xin = bf16_x ? x.to(torch::kFloat) : x;
  const detail::ParamTensors p{keys,       query_weight,      query_bias,
                               swilu_weight, swilu_bias,      value_proj_weight,
                               value_proj_bias, gate_weight,  gate_bias};
  // Inference with a module's state: no autograd node, the state's cache and parameter check.
  if (state && !opt && xin.scalar_type() == torch::kFloat && xin.device().is_cpu() &&
      !detail::wants_grad(xin, p, values) &&
      (values.scalar_type() == torch::kFloat || values.scalar_type() == torch::kBFloat16)) {
    const MemoryConfig c = detail::infer_config(xin.contiguous(), p, values, opts);
    torch::Tensor out = detail::dispatch(xin, values, [&](auto, auto t) {
      using T = decltype(t);
      return detail::stateful_forward(*state, xin, p, c, [&](LayerParameters<float> params) {
        return MemoryLayer<float, T>(std::move(params), detail::view_table<T>(values));
      });
    });
    return bf16_x ? out.to(torch::kBFloat16) : out;
  }
  torch::Tensor out = detail::MemoryFunction::apply(
      xin, keys, query_weight, o(query_bias), o(swilu_weight), o(swilu_bias),
      o(value_proj_weight), o(value_proj_bias), o(gate_weight), o(gate_bias), values, opts,
      sparse_grad, opt);
  return bf16_x ? out.to(torch::kBFloat16) : out;
}

/// A float table (float32, bfloat16 or float16, 2-d) quantized row by row to `format`
/// (pkm::quantize): a new uint8 tensor of (rows, quantized_row_bytes(format, v_dim)).
inline torch::Tensor quantize_values(const torch::Tensor& values, Dtype format) {
  pkm::detail::check_quantized_format("pkm.quantize_values", format);
  if (!values.device().is_cpu() || values.dim() != 2 || values.size(0) < 1 || values.size(1) < 1)
    detail::fail("values must be a non-empty 2-d CPU tensor, got " + detail::shape_of(values));
  const torch::Tensor v = values.detach().contiguous();
  const std::int64_t rows = v.size(0), dim = v.size(1);
  torch::Tensor out = torch::empty({rows, quantized_row_bytes(format, dim)}, torch::kUInt8);
  QuantizedTable q = QuantizedTable::view(format, out.data_ptr<std::uint8_t>(), rows, dim);
  auto run = [&](auto t) {
    using T = decltype(t);
    quantize(ValueTable<T>::view(reinterpret_cast<T*>(v.data_ptr()), rows, dim), q);
  };
  switch (v.scalar_type()) {
    case torch::kFloat:
      run(float{});
      break;
    case torch::kBFloat16:
      run(bf16{});
      break;
    case torch::kHalf:
      run(fp16{});
      break;
    default:
      detail::fail(std::string("values is ") + c10::toString(v.scalar_type()) +
           "; expected float32, bfloat16 or float16");
  }
  return out;
}

/// The layer's forward reading a quantized table: `rows` (uint8, n_keys^2 x
/// quantized_row_bytes(format, v_dim), as quantize_values makes it) holds the table's rows.
/// Inference only: refused (std::invalid_argument, Python's ValueError) where autograd would
/// need a gradient (x or a parameter requires grad with grad mode on). bf16 products as
/// memory() chooses them. With a module's `state`, its cache and parameter check are reused.
inline torch::Tensor memory_quantized(const torch::Tensor& x, const torch::Tensor& keys,
                                      const torch::Tensor& query_weight,
                                      const torch::Tensor& query_bias,
                                      const torch::Tensor& swilu_weight,
                                      const torch::Tensor& swilu_bias,
                                      const torch::Tensor& value_proj_weight,
                                      const torch::Tensor& value_proj_bias,
                                      const torch::Tensor& gate_weight,
                                      const torch::Tensor& gate_bias, const torch::Tensor& rows,
                                      Dtype format, std::int64_t v_dim,
                                      const LayerOptions& options,
                                      const c10::intrusive_ptr<ForwardState>& state = {}) {
  pkm::detail::check_quantized_format("pkm.memory_quantized", format);
  const detail::ParamTensors p{keys,       query_weight,      query_bias,
                               swilu_weight, swilu_bias,      value_proj_weight,
                               value_proj_bias, gate_weight,  gate_bias};
  if (torch::GradMode::is_enabled()) {
    bool grad = x.requires_grad();
    for (const auto& t : p) grad = grad || (t.defined() && t.requires_grad());
    if (grad) {
      detail::fail("the value table is " + std::string(dtype_name(format)) +
           ": quantized tables serve inference only; run under torch.no_grad() or "
           "torch.inference_mode() (no gradient reaches x or the parameters)");
    }
  }
  if (!rows.device().is_cpu() || rows.scalar_type() != torch::kUInt8 || rows.dim() != 2 ||
      !rows.is_contiguous()) {
    detail::fail("the quantized rows must be a contiguous 2-d uint8 CPU tensor, got " +
         std::string(c10::toString(rows.scalar_type())) + " " + detail::shape_of(rows));
  }
  if (v_dim < 1 || rows.size(1) != quantized_row_bytes(format, v_dim)) {
    detail::fail("the quantized rows are " + std::to_string(rows.size(1)) + " bytes; a " +
         dtype_name(format) + " row of v_dim = " + std::to_string(v_dim) + " values has " +
         (v_dim < 1 ? std::string("no size") : std::to_string(quantized_row_bytes(format, v_dim))));
  }
  LayerOptions o = options;
  if (detail::autocast_bf16(x)) o.compute = Dtype::bf16;
  const torch::Tensor xc = x.contiguous();
  const MemoryConfig c = detail::infer_config(xc, p, rows.size(0), v_dim, o);
  if (xc.scalar_type() != torch::kFloat) detail::fail("x must be float32 for a quantized table");
  ForwardState own;  // without a module's state: this call's own cache and check
  return detail::stateful_forward(state ? *state : own, xc, p, c, [&](LayerParameters<float> params) {
    return MemoryLayer<float, Quantized>(
        std::move(params),
        QuantizedTable::view(format, rows.data_ptr<std::uint8_t>(), rows.size(0), v_dim));
  });
}

}  // namespace pkm::torch_ops
