// pkm/io/optimizer_state.hpp — saving and loading optimizer state (pkm/optim) in safetensors
// files, next to the model's tensors: a checkpoint can hold the layer (add_layer), its
// dense optimizer and its value-table optimizer, each under its own prefix.
//
// Works for any optimizer with for_each_state(fn), which calls fn(name, shape, data[, kind])
// for each state tensor (data: float/double moments or int64 step counts; kind: the values it
// may hold, pkm::optim::StateKind — without it, float state must be finite and integer state
// >= 0).
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "pkm/io/safetensors.hpp"
#include "pkm/optim/state.hpp"

namespace pkm::io {

/// Adds the optimizer's state tensors, named prefix + state name, to `w` (kept by pointer
/// until w.write(); the optimizer must stay alive and unchanged until then).
template <class Optimizer>
void add_optimizer_state(SafetensorsWriter& w, Optimizer& optimizer, const std::string& prefix) {
  optimizer.for_each_state(
      [&](const std::string& name, std::vector<std::int64_t> shape, auto* data, auto...) {
        w.add(prefix + name, std::move(shape),
              static_cast<const std::remove_pointer_t<decltype(data)>*>(data));
      });
}

/// Loads state saved by add_optimizer_state into an optimizer built for the same tensors
/// (same registrations and shapes). Every tensor is checked before any is copied — present,
/// the same shape, float or integer as expected, and every value as its kind requires (step
/// counts >= 0, row step counts <= the step count, moments finite, second moments and
/// Adagrad sums >= 0) — so on error (std::invalid_argument naming the tensor, the element
/// and the value) the optimizer is unchanged. Float state converts from F32/F64/BF16/F16.
template <class Optimizer>
void load_optimizer_state(const SafetensorsFile& f, Optimizer& optimizer,
                          const std::string& prefix) {
  const char* who = "pkm::io::load_optimizer_state";
  std::int64_t loaded_step = -1;  // the file's "step", once seen (for_each_state lists it first)
  optimizer.for_each_state([&](const std::string& name, const std::vector<std::int64_t>& shape,
                               auto* data, auto... kind_arg) {
    using T = std::remove_pointer_t<decltype(data)>;
    const std::string full = prefix + name;
    if (!f.has(full)) {
      throw std::invalid_argument(std::string(who) + ": tensor '" + full +
                                  "' is missing from the file; expected the state of an optimizer "
                                  "over the same tensors");
    }
    const TensorInfo& t = f.info(full);
    if (t.shape != shape) {
      throw std::invalid_argument(std::string(who) + ": tensor '" + full + "' has shape " +
                                  detail::clip(t.shape_string()) + ", expected " +
                                  shape_string(shape));
    }
    if (is_float(t.dtype) != std::is_floating_point_v<T>) {
      throw std::invalid_argument(
          std::string(who) + ": tensor '" + full + "' has dtype " + dtype_name(t.dtype) +
          ", expected " + (std::is_floating_point_v<T> ? "a float dtype" : "an integer dtype"));
    }
    optim::StateKind kind =
        std::is_floating_point_v<T> ? optim::StateKind::finite : optim::StateKind::step_count;
    ((kind = kind_arg), ...);
    f.visit<T>(full, [&](const T* v, std::size_t first, std::size_t n) {
      for (std::size_t i = 0; i < n; ++i) {
        if (!optim::state_value_ok(kind, v[i], loaded_step)) {
          throw std::invalid_argument(
              std::string(who) + ": tensor '" + full + "' holds " + std::to_string(v[i]) +
              " at element " + std::to_string(first + i) + "; expected " +
              optim::state_kind_rule(kind) + " (the optimizer is unchanged)");
        }
        if constexpr (!std::is_floating_point_v<T>) {
          if (kind == optim::StateKind::step_count && name == "step")
            loaded_step = static_cast<std::int64_t>(v[i]);
        }
      }
    });
  });
  optimizer.for_each_state(
      [&](const std::string& name, const std::vector<std::int64_t>&, auto* data, auto...) {
        f.read(prefix + name, data, static_cast<std::size_t>(f.info(prefix + name).numel()));
      });
}

}  // namespace pkm::io
