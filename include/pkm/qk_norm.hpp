// pkm/qk_norm.hpp — the parameter-free normalisation of query halves and sub-keys:
// v_hat = v / |v| with |v| = sqrt(v.v + eps), forward and backward.
#pragma once

#include <cmath>

#include "pkm/types.hpp"

namespace pkm {

/// The epsilon inside the norm: |v| = sqrt(v.v + kQkNormEps).
inline constexpr double kQkNormEps = 1e-6;

/// 1 / |v| for the n entries at v.
template <class S>
S qk_inv_norm(const S* v, Index n) {
  S ss = 0;
  for (Index i = 0; i < n; ++i) ss += v[i] * v[i];
  return S(1) / std::sqrt(ss + S(kQkNormEps));
}

/// Given v, inv = 1/|v| and g = dL/dv_hat, writes dL/dv = (g - v_hat <v_hat, g>) * inv.
/// `out` may alias `g`.
template <class S>
void qk_norm_backward(const S* v, S inv, const S* g, Index n, S* out) {
  S dot = 0;
  for (Index i = 0; i < n; ++i) dot += v[i] * g[i];
  dot *= inv;  // <v_hat, g>
  for (Index i = 0; i < n; ++i) out[i] = (g[i] - v[i] * inv * dot) * inv;
}

}  // namespace pkm
