// pkm/linear.hpp — y = x W^T + b over a batch, forward and backward. Each is one full-batch
// product through pkm::gemm (so the weights are packed once per call, not once per token
// block), plus a bias pass whose order of additions is fixed: the same bits with any thread
// count whenever the GEMM backend keeps that promise (pkm/gemm.hpp).
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "pkm/detail/parallel.hpp"
#include "pkm/dtype.hpp"
#include "pkm/gemm.hpp"
#include "pkm/gemm_bf16.hpp"
#include "pkm/types.hpp"

namespace pkm {

namespace detail {
/// pkm::gemm, or pkm::gemm_bf16 where `compute` is Dtype::bf16 (float only) and bf16 products
/// pay: on this CPU (bf16_products_here(); elsewhere fp32), and not for x W^T at a decoding
/// batch of at most kSmallGemmRows tokens (detail::small_batch_product). There the fp32
/// weights are read either way, and rounding them only added work: the layer's forward with
/// its small-batch products rounding to bf16 ran 1.37x (batch 1) and 2.15x (batch 8) slower
/// than in fp32 (BM_DecodeLatency, 2 threads, AMD EPYC Zen 4). The layer's forward passes
/// its weights packed once instead (linear_forward's `packed`), and is bf16 at every batch.
/// Throws std::invalid_argument for another `compute`, or bf16 with double operands.
template <class S>
void gemm_in(Dtype compute, bool trans_a, bool trans_b, Index m, Index n, Index k, const S* a,
             Index lda, const S* b, Index ldb, S beta, S* c, Index ldc) {
  if (compute != Dtype::f32 && compute != Dtype::bf16) {
    throw std::invalid_argument(std::string("pkm: products in ") + dtype_name(compute) +
                                " are not supported; expected F32 or BF16");
  }
  if (compute == Dtype::bf16) {
    if constexpr (std::is_same_v<S, float>) {
      if (bf16_products_here() && !small_batch_product(trans_a, trans_b, m))
        return gemm_bf16(trans_a, trans_b, m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc);
    } else {
      throw std::invalid_argument("pkm: products in BF16 need float operands (these are double)");
    }
  }
  gemm<S>(trans_a, trans_b, m, n, k, S(1), a, lda, b, ldb, beta, c, ldc);
}
}  // namespace detail

/// y = x W^T (+ bias): x is B x in, W is out x in, bias (may be null) has `out` entries.
/// Every function here computes its product in `compute`'s precision (Dtype::f32, or
/// Dtype::bf16: pkm/gemm_bf16.hpp).
///
/// `packed` (may be null) is W rounded to bf16 and packed beforehand (pkm/packed_weights.hpp)
/// for bf16 products with `x_pack` as scratch: then every batch size, decoding ones included,
/// runs the bf16 kernel on it, with the bits of packing W on this call. Throws
/// std::invalid_argument (writing nothing) when `packed` was not made from `w`, compute is not
/// BF16, or `x_pack` is null.
template <class S>
void linear_forward(const ConstMatrixRef<S>& x, const ConstMatrixRef<S>& w, const S* bias,
                    MatrixRef<S> y, Dtype compute = Dtype::f32,
                    const PackedBf16Matrix* packed = nullptr,
                    std::vector<std::uint16_t>* x_pack = nullptr) {
  const Index B = x.rows(), out = w.rows();
  if (packed != nullptr) {
    const char* who = "pkm::linear_forward";
    if (!std::is_same_v<S, float> || compute != Dtype::bf16) {
      throw std::invalid_argument(std::string(who) + ": a packed weight with compute = " +
                                  dtype_name(compute) + (std::is_same_v<S, float> ? "" : " (double)") +
                                  "; expected float operands and compute = BF16");
    }
    if (x_pack == nullptr) throw std::invalid_argument(std::string(who) + ": x_pack is null");
    if (packed->source() != static_cast<const void*>(w.data()) || packed->rows() != out ||
        packed->cols() != w.cols() || x.cols() != w.cols() || w.outerStride() != w.cols()) {
      throw std::invalid_argument(
          std::string(who) + ": the packed weight (" + std::to_string(packed->rows()) + " x " +
          std::to_string(packed->cols()) + ") is not W's (" + std::to_string(out) + " x " +
          std::to_string(w.cols()) + ", x with " + std::to_string(x.cols()) +
          " columns); expected a PackedBf16Matrix made from this W");
    }
  }
  if (bias != nullptr) {
    const ConstVectorMap<S> b(bias, out);
    detail::parallel_blocks(B, detail::kTokenBlock, [&](Index b0, Index b1) {
      for (Index r = b0; r < b1; ++r) y.row(r) = b.transpose();
    });
  }
  if constexpr (std::is_same_v<S, float>) {
    if (packed != nullptr) {
      return gemm_bf16_nt(B, 1.0f, x.data(), x.outerStride(), *packed, bias != nullptr ? 1.0f : 0.0f,
                          y.data(), y.outerStride(), *x_pack);
    }
  }
  detail::gemm_in<S>(compute, false, true, B, out, x.cols(), x.data(), x.outerStride(), w.data(),
                     w.outerStride(), bias != nullptr ? S(1) : S(0), y.data(), y.outerStride());
}

/// dbias += the sum over the batch of dy's rows, in batch order per column.
template <class S>
void bias_backward(const ConstMatrixRef<S>& dy, S* dbias) {
  constexpr Index kCols = 256;
  detail::parallel_blocks(dy.cols(), kCols, [&](Index c0, Index c1) {
    VectorMap<S> db(dbias + c0, c1 - c0);
    for (Index b = 0; b < dy.rows(); ++b) db += dy.row(b).segment(c0, c1 - c0).transpose();
  });
}

/// dW += dy^T x and dbias += sum over the batch of dy (dbias may be null).
template <class S>
void linear_backward_weights(const ConstMatrixRef<S>& x, const ConstMatrixRef<S>& dy,
                             MatrixRef<S> dw, S* dbias, Dtype compute = Dtype::f32) {
  detail::gemm_in<S>(compute, true, false, dw.rows(), dw.cols(), x.rows(), dy.data(),
                     dy.outerStride(), x.data(), x.outerStride(), S(1), dw.data(),
                     dw.outerStride());
  if (dbias != nullptr) bias_backward<S>(dy, dbias);
}

/// dx = dy W, or dx += dy W when `accumulate`.
template <class S>
void linear_backward_input(const ConstMatrixRef<S>& dy, const ConstMatrixRef<S>& w, MatrixRef<S> dx,
                           bool accumulate, Dtype compute = Dtype::f32) {
  detail::gemm_in<S>(compute, false, false, dy.rows(), w.cols(), w.rows(), dy.data(),
                     dy.outerStride(), w.data(), w.outerStride(), accumulate ? S(1) : S(0),
                     dx.data(), dx.outerStride());
}

}  // namespace pkm
