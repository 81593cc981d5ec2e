// pkm/activations.hpp — sigmoid and SiLU with their derivatives.
#pragma once

#include <cmath>

namespace pkm {

/// 1 / (1 + exp(-x)), without overflow for large |x|.
template <class S>
S sigmoid(S x) {
  if (x >= S(0)) return S(1) / (S(1) + std::exp(-x));
  const S e = std::exp(x);
  return e / (S(1) + e);
}

/// silu(x) = x * sigmoid(x).
template <class S>
S silu(S x) {
  return x * sigmoid(x);
}

/// d silu / dx = s (1 + x (1 - s)), s = sigmoid(x).
template <class S>
S silu_grad(S x) {
  const S s = sigmoid(x);
  return s * (S(1) + x * (S(1) - s));
}

}  // namespace pkm
