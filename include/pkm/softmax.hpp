// pkm/softmax.hpp — the per-head softmax over the k selected scores, forward and backward.
#pragma once

#include <cmath>

#include "pkm/types.hpp"

namespace pkm {

/// w = softmax(z) over n entries, computed stably (max subtracted first).
template <class S>
void softmax_forward(const S* z, Index n, S* w) {
  S mx = z[0];
  for (Index i = 1; i < n; ++i) mx = z[i] > mx ? z[i] : mx;
  S sum = 0;
  for (Index i = 0; i < n; ++i) {
    w[i] = std::exp(z[i] - mx);
    sum += w[i];
  }
  const S inv = S(1) / sum;
  for (Index i = 0; i < n; ++i) w[i] *= inv;
}

/// dz = w * (dw - <w, dw>): the gradient of the scores given that of the weights.
template <class S>
void softmax_backward(const S* w, const S* dw, Index n, S* dz) {
  S dot = 0;
  for (Index i = 0; i < n; ++i) dot += w[i] * dw[i];
  for (Index i = 0; i < n; ++i) dz[i] = w[i] * (dw[i] - dot);
}

}  // namespace pkm
