// pkm/io/optimizer_state.hpp — saving and loading optimizer state (pkm/optim) in safetensors
// files, next to the model's tensors: a checkpoint can hold the layer (add_layer), its
// dense optimizer and its value-table optimizer, each under its own prefix.
//
// Works for any optimizer with for_each_state(fn), which calls fn(name, shape, data) for
// each state tensor (data: float/double moments or int64 step counts).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "pkm/io/safetensors.hpp"

namespace pkm::io {

/// Adds the optimizer's state tensors, named prefix + state name, to `w` (kept by pointer
/// until w.write(); the optimizer must stay alive and unchanged until then).
template <class Optimizer>
void add_optimizer_state(SafetensorsWriter& w, Optimizer& optimizer, const std::string& prefix) {
  optimizer.for_each_state([&](const std::string& name, std::vector<std::int64_t> shape, auto* data) {
    w.add(prefix + name, std::move(shape), static_cast<const std::remove_pointer_t<decltype(data)>*>(data));
  });
}

/// Loads state saved by add_optimizer_state into an optimizer built for the same tensors
/// (same registrations and shapes). Every tensor is checked (present, same shape, float or
/// integer as expected) before any is read, so on error (std::invalid_argument naming the
/// tensor) the optimizer is unchanged. Float state converts from F32/F64/BF16/F16.
template <class Optimizer>
void load_optimizer_state(const SafetensorsFile& f, Optimizer& optimizer, const std::string& prefix) {
  optimizer.for_each_state([&](const std::string& name, const std::vector<std::int64_t>& shape, auto* data) {
    using T = std::remove_pointer_t<decltype(data)>;
    const std::string full = prefix + name;
    if (!f.has(full)) {
      throw std::invalid_argument("pkm::io::load_optimizer_state: tensor '" + full +
                                  "' is missing from the file; expected the state of an optimizer "
                                  "over the same tensors");
    }
    const TensorInfo& t = f.info(full);
    if (t.shape != shape) {
      throw std::invalid_argument("pkm::io::load_optimizer_state: tensor '" + full + "' has shape " +
                                  t.shape_string() + ", expected " + shape_string(shape));
    }
    if (is_float(t.dtype) != std::is_floating_point_v<T>) {
      throw std::invalid_argument("pkm::io::load_optimizer_state: tensor '" + full + "' has dtype " +
                                  dtype_name(t.dtype) + ", expected " +
                                  (std::is_floating_point_v<T> ? "a float dtype" : "an integer dtype"));
    }
  });
  optimizer.for_each_state([&](const std::string& name, const std::vector<std::int64_t>&, auto* data) {
    f.read(prefix + name, data, static_cast<std::size_t>(f.info(prefix + name).numel()));
  });
}

}  // namespace pkm::io
