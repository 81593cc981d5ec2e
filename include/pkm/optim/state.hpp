// pkm/optim/state.hpp — what an optimizer's state tensors may hold, and the guard on its step
// counters. An optimizer's for_each_state(fn) calls fn(name, shape, data, kind) for each state
// tensor; pkm::io::load_optimizer_state checks every loaded value against `kind` before it
// changes anything, so a state file can never turn the next step into NaN.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace pkm::optim {

enum class StateKind {
  step_count,   ///< int64, the optimizer's step counter: >= 0
  row_count,    ///< int64, a per-row step counter: >= 0 and <= the step counter
  finite,       ///< float, any finite value (first moments)
  non_negative  ///< float, finite and >= 0 (second moments, Adagrad sums)
};

inline const char* state_kind_rule(StateKind k) {
  switch (k) {
    case StateKind::step_count:
      return "a step count >= 0";
    case StateKind::row_count:
      return "a row step count >= 0 and <= the optimizer's step count";
    case StateKind::finite:
      return "finite values";
    case StateKind::non_negative:
      return "finite values >= 0";
  }
  return "?";
}

/// Whether a loaded state value v may be held by a tensor of this kind (`step`: the
/// optimizer's step count, for row counts; < 0 when not known yet). The one rule every loader
/// of optimizer state applies (pkm::io::load_optimizer_state, the PyTorch operator's
/// ValueOptimizer).
template <class T>
bool state_value_ok(StateKind kind, T v, std::int64_t step) {
  if constexpr (std::is_floating_point_v<T>) {
    return std::isfinite(v) && !(kind == StateKind::non_negative && v < T(0));
  } else {
    return v >= 0 &&
           !(kind == StateKind::row_count && step >= 0 && static_cast<std::int64_t>(v) > step);
  }
}

namespace detail {
/// Throws std::runtime_error (changing nothing) when a step counter cannot count one more
/// step; called before an optimizer changes anything.
inline void check_step_counter(const char* who, std::int64_t step) {
  if (step == std::numeric_limits<std::int64_t>::max()) {
    throw std::runtime_error(std::string(who) + ": the step counter is at its maximum (" +
                             std::to_string(step) + "); nothing was updated");
  }
}
}  // namespace detail

}  // namespace pkm::optim
