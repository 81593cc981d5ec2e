// pkm/optim/grad_clip.hpp — gradient norms and norm clipping, shared by the dense and the
// sparse optimizers. Norms are summed in double over fixed blocks in a fixed order, so a
// norm (and hence every clipped update) has the same bits whatever the thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "pkm/detail/parallel.hpp"
#include "pkm/optim/options.hpp"
#include "pkm/types.hpp"

namespace pkm::optim {

/// The factor a gradient of norm `norm` is multiplied by when clipped to `max_norm`
/// (max_norm <= 0 turns clipping off): min(1, max_norm / (norm + 1e-6)), the rule of
/// torch.nn.utils.clip_grad_norm_.
inline double clip_coefficient(double norm, double max_norm) {
  if (max_norm <= 0.0) return 1.0;
  const double c = max_norm / (norm + 1e-6);
  return c < 1.0 ? c : 1.0;
}

namespace detail {

/// Sum of x[i]^2 in double, serially (for one row).
template <class S>
double sum_of_squares_serial(const S* x, Index n) {
  double s = 0.0;
  for (Index i = 0; i < n; ++i) s += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  return s;
}

/// Sum of x[i]^2 in double, in fixed blocks of 4096 summed in order.
template <class S>
double sum_of_squares(const S* x, Index n) {
  constexpr Index kBlock = 4096;
  const Index nblocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(static_cast<std::size_t>(nblocks), 0.0);
  pkm::detail::parallel_for(nblocks, [&](Index b) {
    partial[b] = sum_of_squares_serial(x + b * kBlock, std::min(kBlock, n - b * kBlock));
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

}  // namespace detail
}  // namespace pkm::optim
