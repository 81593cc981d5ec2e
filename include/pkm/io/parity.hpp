// pkm/io/parity.hpp — run a checkpoint on an input and collect everything a parity check
// compares with PyTorch: y, the selected slots, their softmax weights and, given dy, the input
// gradient and the gradient of every checkpoint tensor (the value table's written densely).
// This is what the pkm_run tool does; it is here so programs and tests can call it too.
#pragma once

#include <string>
#include <vector>

#include "pkm/io/checkpoint.hpp"

namespace pkm::io {

/// One output tensor: F32 data in `f32` or I64 data in `i64`.
struct NamedTensor {
  std::string name;
  Dtype dtype = Dtype::f32;
  std::vector<std::int64_t> shape;
  std::vector<float> f32;
  std::vector<std::int64_t> i64;
};

struct ParityResult {
  MemoryConfig config;
  std::vector<NamedTensor> tensors;

  const NamedTensor& get(const std::string& name) const {
    for (const auto& t : tensors)
      if (t.name == name) return t;
    throw std::out_of_range("pkm::io::ParityResult: no output '" + name + "'");
  }
  /// The outputs as a safetensors writer (it points into this result).
  SafetensorsWriter writer() const {
    SafetensorsWriter w;
    for (const auto& t : tensors) {
      if (t.dtype == Dtype::i64) {
        w.add(t.name, t.shape, t.i64.data());
      } else {
        w.add(t.name, t.shape, t.f32.data());
      }
    }
    return w;
  }
  void write(const std::string& path) const { writer().write(path); }
};

namespace detail {
template <class TableT>
ParityResult run_parity_with(const MemoryLayer<float, TableT>& layer, const SafetensorsFile& input,
                             const LoadOptions& options, bool forward_only) {
  ParityResult r;
  const MemoryConfig& c = layer.config();
  r.config = c;
  auto matrix = [&](const std::string& name, Index cols, const char* what) {
    const TensorInfo& t = input.info(name);
    if (t.shape.size() != 2 || t.shape[1] != cols) {
      throw std::invalid_argument("input '" + input.path() + "': tensor '" + name + "' has shape " +
                                  t.shape_string() + ", expected [B, " + std::to_string(cols) +
                                  "] (" + what + ")");
    }
    RowMatrix<float> m(t.shape[0], cols);
    input.read(name, m.data(), static_cast<std::size_t>(m.size()));
    return m;
  };
  const RowMatrix<float> x = matrix("x", c.input_dim, "input_dim");
  const Index B = x.rows();
  ForwardCache<float> cache;
  const RowMatrix<float> y = layer.forward(x, cache);

  auto add_f32 = [&](const std::string& name, std::vector<std::int64_t> shape, const float* p,
                     Index n) {
    r.tensors.push_back(
        NamedTensor{name, Dtype::f32, std::move(shape), std::vector<float>(p, p + n), {}});
  };
  add_f32("y", {B, c.output_dim}, y.data(), y.size());
  r.tensors.push_back(
      NamedTensor{"indices",
                  Dtype::i64,
                  {B, c.heads, c.knn},
                  {},
                  std::vector<std::int64_t>(cache.indices.data(),
                                            cache.indices.data() + cache.indices.size())});
  add_f32("scores", {B, c.heads, c.knn}, cache.weights.data(), cache.weights.size());

  if (input.has("dy") && !forward_only) {
    if constexpr (std::is_same_v<TableT, Quantized>) {
      throw std::invalid_argument("input '" + input.path() +
                                  "' holds dy, but the checkpoint's value table is " +
                                  dtype_name(layer.values().format()) +
                                  ": quantized tables serve inference only (no gradients; "
                                  "--forward-only / forward_only leaves dy aside)");
    } else {
    if (input.info("dy").shape.size() != 2 || input.info("dy").shape[0] != B) {
      throw std::invalid_argument("input '" + input.path() + "': tensor 'dy' has shape " +
                                  input.info("dy").shape_string() + ", expected [" +
                                  std::to_string(B) + ", " + std::to_string(c.output_dim) + "]");
    }
    const RowMatrix<float> dy = matrix("dy", c.output_dim, "output_dim");
    LayerGradients<float> g(c);
    RowMatrix<float> dx(B, c.input_dim);
    layer.backward(x, cache, dy, g, dx);
    add_f32("dx", {B, c.input_dim}, dx.data(), dx.size());
    g.params.for_each([&](Tensor t, MatrixMap<float> m) {
      add_f32("grad." + options.prefix + tensor_name(t), detail::file_shape(c, t), m.data(),
              m.size());
    });
    RowMatrix<float> dense = RowMatrix<float>::Zero(c.slots(), c.v_dim);
    g.values.add_to(dense);
    add_f32("grad." + options.prefix + "values.weight", {c.slots(), c.v_dim}, dense.data(),
            dense.size());
    }
  }
  return r;
}
}  // namespace detail

/// Runs the layer of `checkpoint` in fp32 on `input` (tensor "x", B x input_dim, and
/// optionally "dy", B x output_dim; `forward_only` leaves dy aside). A checkpoint with a
/// quantized table runs forward only: its dy is refused unless forward_only. Throws
/// std::invalid_argument on a bad checkpoint or input.
inline ParityResult run_parity(const SafetensorsFile& checkpoint, const SafetensorsFile& input,
                               const LoadOptions& options = {}, bool forward_only = false) {
  if (detail::values_format(checkpoint, options.prefix)) {
    return detail::run_parity_with(load_layer<float, Quantized>(checkpoint, options), input,
                                   options, forward_only);
  }
  return detail::run_parity_with(load_layer<float, float>(checkpoint, options), input, options,
                                 forward_only);
}

}  // namespace pkm::io
