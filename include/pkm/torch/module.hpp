// pkm/torch/module.hpp — pkm's memory layer as a libtorch module with the reference
// HashingMemory's parameter names (keys, values.weight, query_proj.query_mlps.0.*,
// swilu_projection.*, value_proj.*, gating.*), for C++ libtorch models. Its forward is
// pkm::torch_ops::memory: pkm's kernels, autograd through pkm's backward.
#pragma once

#include <torch/torch.h>

#include <cmath>
#include <optional>

#include "pkm/torch/memory_function.hpp"

namespace pkm::torch_ops {

struct MemoryModuleOptions {
  std::int64_t input_dim = 0, output_dim = 0;
  std::int64_t n_keys = 0, heads = 4, knn = 32, k_dim = 512;
  std::int64_t v_dim = -1;  ///< -1: output_dim
  bool swilu_projection = true, value_projection = true, gating = false, query_bias = true;
  bool qk_norm = false;
  std::optional<double> qk_norm_scale;  ///< unset: sqrt(k_dim / 2); set: > 0 and finite (checked)
  bool sparse_grad = true;              ///< the table's gradient as a sparse COO tensor
  /// The selected scores' weights: softmax (the reference's) or ReLU.
  ScoreActivation score_activation = ScoreActivation::softmax;
  /// The key search's half scores: F32 (exact dot products) or BF16 (as autocast computes them).
  Dtype score_compute = Dtype::f32;
};

class MemoryModuleImpl : public torch::nn::Module {
 public:
  explicit MemoryModuleImpl(const MemoryModuleOptions& o) : o_(o) {
    const std::int64_t v_dim = o.v_dim > 0 ? o.v_dim : o.output_dim;
    o_.v_dim = v_dim;
    const double bound = 1.0 / std::sqrt(double(o.k_dim));
    keys = register_parameter(
        "keys", torch::empty({2 * o.heads * o.n_keys, o.k_dim / 2}).uniform_(-bound, bound));
    values = register_module(
        "values", torch::nn::Embedding(torch::nn::EmbeddingOptions(o.n_keys * o.n_keys, v_dim)));
    torch::nn::init::normal_(values->weight, 0.0, 1.0 / std::sqrt(double(v_dim)));
    query = torch::nn::Linear(
        torch::nn::LinearOptions(o.input_dim, o.heads * o.k_dim).bias(o.query_bias));
    auto proj = torch::nn::Sequential(query);
    auto query_proj = std::make_shared<torch::nn::Module>();
    query_proj->register_module("query_mlps", proj);
    register_module("query_proj", query_proj);
    if (o.swilu_projection)
      swilu = register_module("swilu_projection", torch::nn::Linear(o.input_dim, v_dim));
    if (o.value_projection)
      value_proj = register_module("value_proj", torch::nn::Linear(v_dim, o.output_dim));
    if (o.gating) gate = register_module("gating", torch::nn::Linear(o.input_dim, 1));
  }

  /// x: (..., input_dim) -> (..., output_dim). With `optimizer`, the table is updated inside
  /// backward (the fused mode) and gets no gradient.
  torch::Tensor forward(const torch::Tensor& x,
                        const c10::intrusive_ptr<ValueOptimizer>& optimizer = {}) {
    LayerOptions lo;
    lo.heads = o_.heads;
    lo.knn = o_.knn;
    lo.qk_norm = o_.qk_norm;
    lo.qk_norm_scale = o_.qk_norm_scale;
    lo.score_activation = o_.score_activation;
    lo.score_compute = o_.score_compute;
    auto w = [](const torch::nn::Linear& l) { return l ? l->weight : torch::Tensor(); };
    auto b = [](const torch::nn::Linear& l) {
      return l && l->bias.defined() ? l->bias : torch::Tensor();
    };
    return memory(x, keys, query->weight, b(query), w(swilu), b(swilu), w(value_proj),
                  b(value_proj), w(gate), b(gate), values->weight, lo, o_.sparse_grad, optimizer);
  }

  /// pkm's optimizer for this module's table, for the fused mode ("adam" or "adagrad").
  /// With `accumulate`, backwards only add their gradient rows and the optimizer's
  /// step(table) applies them (gradient accumulation).
  c10::intrusive_ptr<ValueOptimizer> make_value_optimizer(const std::string& kind, double lr,
                                                          double max_grad_norm = 0.0,
                                                          double weight_decay = 0.0,
                                                          bool accumulate = false) {
    return c10::make_intrusive<ValueOptimizer>(kind, values->weight.size(0), values->weight.size(1),
                                               lr, max_grad_norm, weight_decay, 0.9, 0.999, 1e-8,
                                               accumulate);
  }

  torch::Tensor keys;
  torch::nn::Embedding values{nullptr};
  torch::nn::Linear query{nullptr}, swilu{nullptr}, value_proj{nullptr}, gate{nullptr};

 private:
  MemoryModuleOptions o_;
};
TORCH_MODULE(MemoryModule);

}  // namespace pkm::torch_ops
