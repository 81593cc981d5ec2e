// pkm/softmax.hpp — a head's k selected scores to the weights of the rows it reads, forward
// and backward: the softmax (the default), or ReLU (MemoryConfig::score_activation).
#pragma once

#include <cmath>

#include "pkm/config.hpp"
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

/// w = max(z, 0) over n entries.
template <class S>
void relu_forward(const S* z, Index n, S* w) {
  for (Index i = 0; i < n; ++i) w[i] = z[i] > S(0) ? z[i] : S(0);
}

/// dz = dw where z > 0, else 0 (dz may be dw).
template <class S>
void relu_backward(const S* z, const S* dw, Index n, S* dz) {
  for (Index i = 0; i < n; ++i) dz[i] = z[i] > S(0) ? dw[i] : S(0);
}

/// The weights w of the n scores z under activation `a`.
template <class S>
void score_weights_forward(ScoreActivation a, const S* z, Index n, S* w) {
  if (a == ScoreActivation::relu)
    relu_forward(z, n, w);
  else
    softmax_forward(z, n, w);
}

/// The gradient dz of the scores z (whose weights are w) given that of the weights, dw (dz
/// may be dw).
template <class S>
void score_weights_backward(ScoreActivation a, const S* z, const S* w, const S* dw, Index n,
                            S* dz) {
  if (a == ScoreActivation::relu)
    relu_backward(z, dw, n, dz);
  else
    softmax_backward(w, dw, n, dz);
}

}  // namespace pkm
