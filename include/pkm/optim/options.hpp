// pkm/optim/options.hpp — how every optimizer's options are checked: one rule per kind of
// field (a learning rate, a weight decay, a clip norm, an eps, a beta), one message form
// ("who: field = value, expected ..."), and set_lr's validation. Each options struct lists
// its fields once (fields()) and its validate() names only what is its own.
#pragma once

#include <cmath>
#include <stdexcept>
#include <string>

#include "pkm/errors.hpp"

namespace pkm::optim::detail {

/// Checks an optimizer option: finite and within [lo, hi] (or [lo, hi) when hi_open).
inline void check_option(const char* who, const char* field, double value, double lo, double hi,
                         bool hi_open, const char* expected) {
  const bool ok = std::isfinite(value) && value >= lo && (hi_open ? value < hi : value <= hi);
  if (!ok) throw_expected(who, field, std::to_string(value), expected);
}

/// `options` with lr replaced, validated (for the optimizers' set_lr).
template <class Options>
Options with_lr(Options options, double lr, const char* who) {
  options.lr = lr;
  options.validate(who);
  return options;
}

/// The fields every optimizer has: a finite lr >= 0, a finite weight_decay >= 0 and a finite
/// max_grad_norm >= 0 (0 turns clipping off).
inline void check_step_options(const char* who, double lr, double weight_decay,
                               double max_grad_norm) {
  check_option(who, "lr", lr, 0.0, HUGE_VAL, false, "a finite lr >= 0");
  check_option(who, "weight_decay", weight_decay, 0.0, HUGE_VAL, false,
               "a finite weight_decay >= 0");
  check_option(who, "max_grad_norm", max_grad_norm, 0.0, HUGE_VAL, false,
               "a finite max_grad_norm >= 0 (0 turns clipping off)");
}

/// A finite eps > 0 (a denominator's guard).
inline void check_eps(const char* who, double eps) {
  check_option(who, "eps", eps, 1e-300, HUGE_VAL, false, "a finite eps > 0");
}

}  // namespace pkm::optim::detail
