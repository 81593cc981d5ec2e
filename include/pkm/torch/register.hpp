// pkm/torch/register.hpp — registers pkm's memory layer with PyTorch's dispatcher as
// torch.ops.pkm.memory (and, reading a quantized table, torch.ops.pkm.memory_quantized with
// torch.ops.pkm.quantize_values), and pkm's value optimizer as torch.classes.pkm.ValueOptimizer.
// Include it in exactly one translation unit of a shared library (src/pkm_torch_ops.cpp is
// that library: CMake target pkm_torch_ops, loaded by python/pkm_torch.py). C++ code calls
// pkm::torch_ops::memory directly and needs no registration.
#pragma once

#include <torch/library.h>
#include <torch/torch.h>

#include "pkm/torch/memory_function.hpp"

namespace pkm::torch_ops::detail {
inline ScoreActivation score_activation_option(const std::string& name) {
  const auto a = parse_score_activation(name);
  if (!a) fail("score_activation = '" + name + "' is not supported; expected 'softmax' or 'relu'");
  return *a;
}

/// F32 or BF16 for a precision argument (`field`: the argument's name), else throws.
inline Dtype products_option(const char* field, const std::string& name) {
  const auto dtype = parse_dtype(name);
  if (!dtype || (*dtype != Dtype::f32 && *dtype != Dtype::bf16)) {
    fail(std::string(field) + " = '" + name + "' is not supported; expected 'F32' or 'BF16'");
  }
  return *dtype;
}

/// The LayerOptions of an op's arguments (both forward ops take the same ones).
inline LayerOptions layer_options(std::int64_t heads, std::int64_t knn, bool qk_norm,
                                  c10::optional<double> qk_norm_scale, const std::string& compute,
                                  const std::string& score_activation,
                                  const std::string& score_compute) {
  LayerOptions options;
  options.heads = heads;
  options.knn = knn;
  options.qk_norm = qk_norm;
  if (qk_norm_scale) options.qk_norm_scale = *qk_norm_scale;
  options.score_activation = score_activation_option(score_activation);
  options.compute = products_option("compute", compute);
  options.score_compute = products_option("score_compute", score_compute);
  return options;
}

inline torch::Tensor memory_op(const torch::Tensor& x, const torch::Tensor& keys,
                               const torch::Tensor& query_weight,
                               const c10::optional<torch::Tensor>& query_bias,
                               const c10::optional<torch::Tensor>& swilu_weight,
                               const c10::optional<torch::Tensor>& swilu_bias,
                               const c10::optional<torch::Tensor>& value_proj_weight,
                               const c10::optional<torch::Tensor>& value_proj_bias,
                               const c10::optional<torch::Tensor>& gate_weight,
                               const c10::optional<torch::Tensor>& gate_bias,
                               const torch::Tensor& values, std::int64_t heads, std::int64_t knn,
                               bool qk_norm, c10::optional<double> qk_norm_scale, bool sparse_grad,
                               const c10::optional<c10::intrusive_ptr<ValueOptimizer>>& optimizer,
                               const std::string& compute,
                               const c10::optional<c10::intrusive_ptr<ForwardState>>& state,
                               const std::string& score_activation,
                               const std::string& score_compute) {
  auto t = [](const c10::optional<torch::Tensor>& o) { return o ? *o : torch::Tensor(); };
  const LayerOptions options = layer_options(heads, knn, qk_norm, qk_norm_scale, compute,
                                             score_activation, score_compute);
  return memory(x, keys, query_weight, t(query_bias), t(swilu_weight), t(swilu_bias),
                t(value_proj_weight), t(value_proj_bias), t(gate_weight), t(gate_bias), values,
                options, sparse_grad,
                optimizer ? *optimizer : c10::intrusive_ptr<ValueOptimizer>(),
                state ? *state : c10::intrusive_ptr<ForwardState>());
}
inline Dtype quantized_format(const std::string& format) {
  const auto d = parse_quantized_dtype(format);
  if (!d) fail("format = '" + format + "' is not supported; expected 'int8', 'int4' or 'fp8'");
  return *d;
}

inline torch::Tensor memory_quantized_op(
    const torch::Tensor& x, const torch::Tensor& keys, const torch::Tensor& query_weight,
    const c10::optional<torch::Tensor>& query_bias,
    const c10::optional<torch::Tensor>& swilu_weight,
    const c10::optional<torch::Tensor>& swilu_bias,
    const c10::optional<torch::Tensor>& value_proj_weight,
    const c10::optional<torch::Tensor>& value_proj_bias,
    const c10::optional<torch::Tensor>& gate_weight, const c10::optional<torch::Tensor>& gate_bias,
    const torch::Tensor& rows, const std::string& format, std::int64_t v_dim, std::int64_t heads,
    std::int64_t knn, bool qk_norm, c10::optional<double> qk_norm_scale,
    const std::string& compute, const c10::optional<c10::intrusive_ptr<ForwardState>>& state,
    const std::string& score_activation, const std::string& score_compute) {
  auto t = [](const c10::optional<torch::Tensor>& o) { return o ? *o : torch::Tensor(); };
  const LayerOptions options =
      layer_options(heads, knn, qk_norm, qk_norm_scale, compute, score_activation, score_compute);
  return memory_quantized(x, keys, query_weight, t(query_bias), t(swilu_weight), t(swilu_bias),
                          t(value_proj_weight), t(value_proj_bias), t(gate_weight), t(gate_bias),
                          rows, quantized_format(format), v_dim, options,
                          state ? *state : c10::intrusive_ptr<ForwardState>());
}
}  // namespace pkm::torch_ops::detail

TORCH_LIBRARY(pkm, m) {
  using pkm::torch_ops::ForwardState;
  using pkm::torch_ops::ValueOptimizer;
  // A module's inference state: nothing to save (a copy or an unpickled module starts afresh).
  m.class_<ForwardState>("ForwardState")
      .def(torch::init<>())
      .def_pickle([](const c10::intrusive_ptr<ForwardState>&) { return std::int64_t{0}; },
                  [](std::int64_t) { return c10::make_intrusive<ForwardState>(); });
  m.class_<ValueOptimizer>("ValueOptimizer")
      .def(torch::init<std::string, std::int64_t, std::int64_t, double, double, double, double,
                       double, double, bool>())
      .def("kind", [](const c10::intrusive_ptr<ValueOptimizer>& self) { return self->kind(); })
      .def("options", &ValueOptimizer::options)
      .def("accumulates", &ValueOptimizer::accumulates)
      .def("rows", &ValueOptimizer::rows)
      .def("dim", &ValueOptimizer::dim)
      .def("steps", &ValueOptimizer::steps)
      .def("set_lr", &ValueOptimizer::set_lr)
      .def("last_norm", &ValueOptimizer::last_norm)
      .def("pending_rows", &ValueOptimizer::pending_rows)
      .def("step", &ValueOptimizer::step)
      .def("zero_grad", &ValueOptimizer::zero_grad)
      .def("state", &ValueOptimizer::state)
      .def("load_state", &ValueOptimizer::load_state)
      .def_pickle(
          [](const c10::intrusive_ptr<ValueOptimizer>& self) { return self->pickle(); },
          [](ValueOptimizer::Pickled state) { return ValueOptimizer::unpickle(std::move(state)); });
  m.def(
      "check_config(int input_dim, int output_dim, int n_keys, int heads, int knn, int k_dim, int "
      "v_dim, "
      "bool memory_plus, bool value_projection, bool gating, bool query_bias, bool qk_norm, float? "
      "qk_norm_scale, str score_activation=\"softmax\") -> ()",
      [](std::int64_t input_dim, std::int64_t output_dim, std::int64_t n_keys, std::int64_t heads,
         std::int64_t knn, std::int64_t k_dim, std::int64_t v_dim, bool memory_plus,
         bool value_projection, bool gating, bool query_bias, bool qk_norm,
         c10::optional<double> qk_norm_scale, const std::string& score_activation) {
        std::optional<double> scale;
        if (qk_norm_scale) scale = *qk_norm_scale;
        pkm::torch_ops::detail::check_config(
            input_dim, output_dim, n_keys, heads, knn, k_dim, v_dim, memory_plus, value_projection,
            gating, query_bias, qk_norm, scale,
            pkm::torch_ops::detail::score_activation_option(score_activation));
      });
  m.def(
      "memory(Tensor x, Tensor keys, Tensor query_weight, Tensor? query_bias, Tensor? "
      "swilu_weight, "
      "Tensor? swilu_bias, Tensor? value_proj_weight, Tensor? value_proj_bias, Tensor? "
      "gate_weight, "
      "Tensor? gate_bias, Tensor values, int heads, int knn, bool qk_norm, float? qk_norm_scale, "
      "bool sparse_grad, "
      "__torch__.torch.classes.pkm.ValueOptimizer? optimizer, str compute=\"F32\", "
      "__torch__.torch.classes.pkm.ForwardState? state=None, "
      "str score_activation=\"softmax\", str score_compute=\"F32\") -> Tensor",
      &pkm::torch_ops::detail::memory_op);
  m.def("quantize_values(Tensor values, str format) -> Tensor",
        [](const torch::Tensor& values, const std::string& format) {
          return pkm::torch_ops::quantize_values(
              values, pkm::torch_ops::detail::quantized_format(format));
        });
  m.def(
      "memory_quantized(Tensor x, Tensor keys, Tensor query_weight, Tensor? query_bias, Tensor? "
      "swilu_weight, Tensor? swilu_bias, Tensor? value_proj_weight, Tensor? value_proj_bias, "
      "Tensor? gate_weight, Tensor? gate_bias, Tensor rows, str format, int v_dim, int heads, "
      "int knn, bool qk_norm, float? qk_norm_scale, str compute=\"F32\", "
      "__torch__.torch.classes.pkm.ForwardState? state=None, "
      "str score_activation=\"softmax\", str score_compute=\"F32\") -> Tensor",
      &pkm::torch_ops::detail::memory_quantized_op);
}
