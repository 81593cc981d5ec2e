// pkm/memory_output.hpp — the output op of a memory layer: from the read y (B x v_dim) and the
// layer input x to the layer output, forward and backward:
//
//   Memory+ (memory_plus):        o = W2 (y * silu(W1 x + b1)) + b2
//   projection (value_projection): o = W2 y + b2
//   neither:                       o = y
//   gate (gating, optional):       out = sigmoid(wg . x + bg) * o
//
// Every product is one full-batch pkm::gemm; the elementwise parts run over fixed blocks of
// tokens. The same bits with any thread count.
#pragma once

#include "pkm/activations.hpp"
#include "pkm/config.hpp"
#include "pkm/detail/parallel.hpp"
#include "pkm/linear.hpp"
#include "pkm/packed_weights.hpp"
#include "pkm/parameters.hpp"
#include "pkm/types.hpp"

namespace pkm {

/// What the output op's forward keeps for its backward.
template <class S>
struct OutputCache {
  RowMatrix<S> swilu_pre;  ///< B x v_dim: G = W1 x + b1 (memory_plus only)
  RowMatrix<S> hidden;     ///< B x v_dim: y * silu(G) (memory_plus only)
  RowMatrix<S> pre_gate;   ///< B x output_dim: output before the gate (gating only)
  Vector<S> gate;          ///< B: sigmoid(wg . x + bg) (gating only)
};

/// Buffers the output op's backward reuses from call to call.
template <class S>
struct OutputWorkspace {
  RowMatrix<S> d_gated;  ///< B x output_dim: gradient of the output before the gate
  Vector<S> dt;          ///< B: gradient of the gate's pre-activation
  RowMatrix<S> du;       ///< B x v_dim: gradient of the Memory+ hidden
  RowMatrix<S> d_swilu;  ///< B x v_dim: gradient of G = W1 x + b1
};

namespace detail {
/// The tensor's data (const or not, as `p`), or null where the config has no such tensor.
template <class Params>
auto bias_or_null(Params& p, Tensor t) -> decltype(p.data(t)) {
  return p.has(t) ? p.data(t) : nullptr;
}
}  // namespace detail

/// Forward: writes out (B x output_dim) from x (B x input_dim) and the read y (B x v_dim).
/// `products` (may be null): the packed bf16 weights and scratch of the layer's forward
/// (pkm/packed_weights.hpp); without it the products pack their weights on every call.
template <class S>
void output_forward(const LayerParameters<S>& p, const ConstMatrixRef<S>& x,
                    const ConstMatrixRef<S>& y, MatrixRef<S> out, OutputCache<S>& cache,
                    ProductScratch* products = nullptr) {
  std::vector<std::uint16_t>* x_pack = products != nullptr ? &products->x_pack : nullptr;
  auto packed_w = [&](Tensor t) { return products != nullptr ? products->of(t) : nullptr; };
  const MemoryConfig& c = p.config();
  const Index B = x.rows();
  if (c.memory_plus) {
    cache.swilu_pre.resize(B, c.v_dim);
    cache.hidden.resize(B, c.v_dim);
  }
  if (c.gating) {
    cache.pre_gate.resize(B, c.output_dim);
    cache.gate.resize(B);
  }
  if (B == 0) return;
  MatrixRef<S> o = c.gating ? MatrixRef<S>(cache.pre_gate) : out;
  if (c.memory_plus) {
    linear_forward<S>(x, p.swilu_weight(), detail::bias_or_null(p, Tensor::swilu_bias),
                      cache.swilu_pre, c.compute, packed_w(Tensor::swilu_weight),
                      x_pack);
    detail::parallel_blocks(B, detail::kTokenBlock, [&](Index b0, Index b1) {
      for (Index b = b0; b < b1; ++b) {
        for (Index d = 0; d < c.v_dim; ++d)
          cache.hidden(b, d) = y(b, d) * silu<S>(cache.swilu_pre(b, d));
      }
    });
    linear_forward<S>(cache.hidden, p.value_proj_weight(),
                      detail::bias_or_null(p, Tensor::value_proj_bias), o, c.compute,
                      packed_w(Tensor::value_proj_weight), x_pack);
  } else if (c.value_projection) {
    linear_forward<S>(y, p.value_proj_weight(), detail::bias_or_null(p, Tensor::value_proj_bias),
                      o, c.compute, packed_w(Tensor::value_proj_weight), x_pack);
  } else {
    detail::parallel_blocks(B, detail::kTokenBlock, [&](Index b0, Index b1) {
      o.middleRows(b0, b1 - b0) = y.middleRows(b0, b1 - b0);
    });
  }
  if (c.gating) {
    const auto wg = p.gate_weight();
    const S bg = p.gate_bias();
    detail::parallel_blocks(B, detail::kTokenBlock, [&](Index b0, Index b1) {
      for (Index b = b0; b < b1; ++b) {
        const S g = sigmoid<S>(x.row(b).dot(wg.transpose()) + bg);
        cache.gate[b] = g;
        out.row(b) = g * cache.pre_gate.row(b);
      }
    });
  }
}

/// Backward of output_forward, given dout, first half: writes dy, the gradient of the read
/// (B x v_dim), and keeps in `ws` what output_backward_weights and output_backward_input
/// need. Changes no parameter gradient, so a caller can check dy before anything is added.
template <class S>
void output_backward(const LayerParameters<S>& p, const ConstMatrixRef<S>& y,
                     const OutputCache<S>& cache, const ConstMatrixRef<S>& dout, MatrixRef<S> dy,
                     OutputWorkspace<S>& ws) {
  const MemoryConfig& c = p.config();
  const Index B = dout.rows();
  if (B == 0) return;
  // Gate: d_o = g dout, dt = <dout, o> g (1 - g).
  if (c.gating) {
    ws.d_gated.resize(B, c.output_dim);
    ws.dt.resize(B);
    detail::parallel_blocks(B, detail::kTokenBlock, [&](Index b0, Index b1) {
      for (Index b = b0; b < b1; ++b) {
        const S g = cache.gate[b];
        ws.dt[b] = dout.row(b).dot(cache.pre_gate.row(b)) * g * (S(1) - g);
        ws.d_gated.row(b) = g * dout.row(b);
      }
    });
  }
  const ConstMatrixRef<S> d_o = c.gating ? ConstMatrixRef<S>(ws.d_gated) : dout;
  if (c.memory_plus) {
    ws.du.resize(B, c.v_dim);
    linear_backward_input<S>(d_o, p.value_proj_weight(), ws.du, false, c.compute);
    ws.d_swilu.resize(B, c.v_dim);
    detail::parallel_blocks(B, detail::kTokenBlock, [&](Index b0, Index b1) {
      for (Index b = b0; b < b1; ++b) {
        for (Index d = 0; d < c.v_dim; ++d) {
          const S G = cache.swilu_pre(b, d), du = ws.du(b, d);
          dy(b, d) = du * silu<S>(G);
          ws.d_swilu(b, d) = du * y(b, d) * silu_grad<S>(G);
        }
      }
    });
  } else if (c.value_projection) {
    linear_backward_input<S>(d_o, p.value_proj_weight(), dy, false, c.compute);
  } else {
    detail::parallel_blocks(B, detail::kTokenBlock, [&](Index b0, Index b1) {
      dy.middleRows(b0, b1 - b0) = d_o.middleRows(b0, b1 - b0);
    });
  }
}

/// Second half: adds the output op's parameter gradients (W1, b1, W2, b2, wg, bg) to dparams,
/// from what output_backward left in `ws`.
template <class S>
void output_backward_weights(const LayerParameters<S>& p, const ConstMatrixRef<S>& x,
                             const ConstMatrixRef<S>& y, const OutputCache<S>& cache,
                             const ConstMatrixRef<S>& dout, const OutputWorkspace<S>& ws,
                             LayerParameters<S>& dparams) {
  const MemoryConfig& c = p.config();
  const Index B = x.rows();
  if (B == 0) return;
  if (c.gating) {
    const ConstMatrixMap<S> dt_col(ws.dt.data(), B, 1);
    linear_backward_weights<S>(x, dt_col, dparams.matrix(Tensor::gate_weight),
                               dparams.data(Tensor::gate_bias));
  }
  const ConstMatrixRef<S> d_o = c.gating ? ConstMatrixRef<S>(ws.d_gated) : dout;
  if (c.memory_plus) {
    linear_backward_weights<S>(cache.hidden, d_o, dparams.value_proj_weight(),
                               detail::bias_or_null(dparams, Tensor::value_proj_bias), c.compute);
    linear_backward_weights<S>(x, ws.d_swilu, dparams.swilu_weight(),
                               detail::bias_or_null(dparams, Tensor::swilu_bias), c.compute);
  } else if (c.value_projection) {
    linear_backward_weights<S>(y, d_o, dparams.value_proj_weight(),
                               detail::bias_or_null(dparams, Tensor::value_proj_bias), c.compute);
  }
}

/// Adds the output op's share of the input gradient to dx: dG W1 (Memory+) and dt wg (gate).
template <class S>
void output_backward_input(const LayerParameters<S>& p, const OutputWorkspace<S>& ws,
                           MatrixRef<S> dx) {
  const MemoryConfig& c = p.config();
  if (dx.rows() == 0) return;
  if (c.memory_plus) linear_backward_input<S>(ws.d_swilu, p.swilu_weight(), dx, true, c.compute);
  if (c.gating) {
    const ConstMatrixMap<S> dt_col(ws.dt.data(), dx.rows(), 1);
    linear_backward_input<S>(dt_col, p.matrix(Tensor::gate_weight), dx, true);
  }
}

}  // namespace pkm
