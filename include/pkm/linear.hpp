// pkm/linear.hpp — y = x W^T + b over a batch, forward and backward, deterministic under
// threads: tokens (forward, input gradient) or weight rows (weight gradient) are split into
// fixed blocks, each computed serially.
#pragma once

#include "pkm/detail/parallel.hpp"
#include "pkm/types.hpp"

namespace pkm {

/// y = x W^T (+ bias): x is B x in, W is out x in, bias (may be null) has `out` entries.
template <class S>
void linear_forward(const ConstMatrixRef<S>& x, const ConstMatrixRef<S>& w, const S* bias,
                    MatrixRef<S> y) {
  detail::parallel_blocks(x.rows(), detail::kTokenBlock, [&](Index b0, Index b1) {
    auto yb = y.middleRows(b0, b1 - b0);
    yb.noalias() = x.middleRows(b0, b1 - b0) * w.transpose();
    if (bias != nullptr) yb.rowwise() += ConstVectorMap<S>(bias, w.rows()).transpose();
  });
}

/// dW += dy^T x and dbias += sum over the batch of dy (dbias may be null).
template <class S>
void linear_backward_weights(const ConstMatrixRef<S>& x, const ConstMatrixRef<S>& dy,
                             MatrixRef<S> dw, S* dbias) {
  detail::parallel_blocks(dw.rows(), detail::kTokenBlock, [&](Index r0, Index r1) {
    const Index n = r1 - r0;
    dw.middleRows(r0, n).noalias() += dy.middleCols(r0, n).transpose() * x;
    if (dbias != nullptr) {
      VectorMap<S> db(dbias + r0, n);
      for (Index b = 0; b < dy.rows(); ++b) db += dy.row(b).segment(r0, n).transpose();
    }
  });
}

/// dx = dy W, or dx += dy W when `accumulate`.
template <class S>
void linear_backward_input(const ConstMatrixRef<S>& dy, const ConstMatrixRef<S>& w,
                           MatrixRef<S> dx, bool accumulate) {
  detail::parallel_blocks(dy.rows(), detail::kTokenBlock, [&](Index b0, Index b1) {
    auto dxb = dx.middleRows(b0, b1 - b0);
    if (accumulate) {
      dxb.noalias() += dy.middleRows(b0, b1 - b0) * w;
    } else {
      dxb.noalias() = dy.middleRows(b0, b1 - b0) * w;
    }
  });
}

}  // namespace pkm
