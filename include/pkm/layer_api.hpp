// pkm/layer_api.hpp — the one API of a memory layer, shared by pkm::MemoryLayer and
// pkm::distributed::MemoryParallelLayer (and any layer built on pkm/layer_composition.hpp):
//
//   forward(x, out, cache)                          out = layer(x), cache filled for backward
//   forward(x, cache) -> out                        the same, returning a new matrix
//   backward(x, cache, dout, dparams, dvalues[, dx]) dense gradients added to dparams, the
//   backward(x, cache, dout, grads[, dx])            value gradient merged into a SparseRowGrad
//   backward_to(x, cache, dout, dparams, sink[, dx]) the value gradient handed to a sink
//                                                   (pkm/value_gradient.hpp): the extension point
//   backward_fused(x, cache, dout, dparams, optimizer[, dx]) -> norm
//                                                   the value gradient applied by a sparse
//                                                   optimizer at once, never stored
//
// `out` and `dx` may be of any Eigen layout (a row-major temporary is written and copied out
// only when the call succeeds); inputs of any layout are copied to row-major by Eigen::Ref.
//
// A layer derives from LayerApi<Layer, Scalar, Cache> and provides, as the single
// implementations of these entry points:
//   void forward_core(const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> out, Cache& cache) const;
//   template <class Sink>
//   void backward_core(x, cache, dout, dparams, Sink& sink, MatrixRef<Scalar>* dx) const;
//   template <class Opt>
//   double backward_fused_core(x, cache, dout, dparams, Opt& opt, MatrixRef<Scalar>* dx);
//   Index value_rows() const, value_width() const;   the table's rows and this layer's row width
// (backward_core checks its sink with check_sink before anything is written).
#pragma once

#include <type_traits>

#include "pkm/layer_cache.hpp"
#include "pkm/parameters.hpp"
#include "pkm/sparse_grad.hpp"
#include "pkm/types.hpp"
#include "pkm/value_gradient.hpp"

namespace pkm {

template <class Derived, class Scalar, class Cache>
class LayerApi {
 public:
  // ---- forward --------------------------------------------------------------------------

  /// out = layer(x) for a batch of B tokens (x: B x input_dim, out: B x output_dim), filling
  /// `cache` for backward. A batch of 0 tokens is valid. Throws, before writing anything,
  /// std::invalid_argument for a wrong shape or a non-finite input and std::runtime_error for a
  /// non-finite dense parameter; then std::runtime_error for what finite values can still
  /// produce (an overflowing query, score or output; a non-finite table row read). After any
  /// throw the cache is marked unfilled and backward refuses it.
  void forward(const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> out, Cache& cache) const {
    self().forward_core(x, out, cache);
  }
  /// Returns the output as a new matrix.
  RowMatrix<Scalar> forward(const ConstMatrixRef<Scalar>& x, Cache& cache) const {
    RowMatrix<Scalar> out(x.rows(), self().config().output_dim);
    self().forward_core(x, out, cache);
    return out;
  }
  /// Into an output of any layout.
  template <class Out, std::enable_if_t<!std::is_convertible_v<Out&, MatrixRef<Scalar>>, int> = 0>
  void forward(const ConstMatrixRef<Scalar>& x, const Eigen::MatrixBase<Out>& out,
               Cache& cache) const {
    RowMatrix<Scalar> rows(out.rows(), out.cols());
    self().forward_core(x, rows, cache);
    const_cast<Eigen::MatrixBase<Out>&>(out) = rows;  // Eigen's idiom for writable expressions
  }

  // ---- backward into a sink: the extension point -------------------------------------------

  /// Backward of the forward that filled `cache` with input `x` (the same x and parameters):
  /// adds the dense parameter gradients to `dparams`, hands the value gradient to `sink`
  /// (pkm/value_gradient.hpp) and writes dx. Every argument (the sink's check included) is
  /// validated before anything is written.
  template <class Sink>
  void backward_to(const ConstMatrixRef<Scalar>& x, const Cache& cache,
                   const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                   Sink&& sink, MatrixRef<Scalar> dx) const {
    self().backward_core(x, cache, dout, dparams, sink, &dx);
  }
  template <class Sink>
  void backward_to(const ConstMatrixRef<Scalar>& x, const Cache& cache,
                   const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                   Sink&& sink) const {
    self().backward_core(x, cache, dout, dparams, sink, nullptr);
  }

  // ---- backward into a SparseRowGrad -----------------------------------------------------------

  /// backward_to with the value gradient merged (added) into `dvalues`.
  void backward(const ConstMatrixRef<Scalar>& x, const Cache& cache,
                const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                SparseRowGrad<Scalar>& dvalues, MatrixRef<Scalar> dx) const {
    sparse_backward(x, cache, dout, dparams, dvalues, &dx);
  }
  void backward(const ConstMatrixRef<Scalar>& x, const Cache& cache,
                const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                SparseRowGrad<Scalar>& dvalues) const {
    sparse_backward(x, cache, dout, dparams, dvalues, nullptr);
  }
  void backward(const ConstMatrixRef<Scalar>& x, const Cache& cache,
                const ConstMatrixRef<Scalar>& dout, LayerGradients<Scalar>& grads,
                MatrixRef<Scalar> dx) const {
    sparse_backward(x, cache, dout, grads.params, grads.values, &dx);
  }
  void backward(const ConstMatrixRef<Scalar>& x, const Cache& cache,
                const ConstMatrixRef<Scalar>& dout, LayerGradients<Scalar>& grads) const {
    sparse_backward(x, cache, dout, grads.params, grads.values, nullptr);
  }
  /// With dx of any layout.
  template <class Dx, std::enable_if_t<!std::is_convertible_v<Dx&, MatrixRef<Scalar>>, int> = 0>
  void backward(const ConstMatrixRef<Scalar>& x, const Cache& cache,
                const ConstMatrixRef<Scalar>& dout, LayerGradients<Scalar>& grads,
                const Eigen::MatrixBase<Dx>& dx) const {
    backward(x, cache, dout, grads.params, grads.values, dx);
  }
  template <class Dx, std::enable_if_t<!std::is_convertible_v<Dx&, MatrixRef<Scalar>>, int> = 0>
  void backward(const ConstMatrixRef<Scalar>& x, const Cache& cache,
                const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                SparseRowGrad<Scalar>& dvalues, const Eigen::MatrixBase<Dx>& dx) const {
    RowMatrix<Scalar> rows(dx.rows(), dx.cols());
    MatrixRef<Scalar> ref(rows);
    sparse_backward(x, cache, dout, dparams, dvalues, &ref);
    const_cast<Eigen::MatrixBase<Dx>&>(dx) = rows;
  }

  // ---- backward fused with a sparse optimizer ------------------------------------------------

  /// Backward with the value table updated in place by `value_optimizer` (LazyAdam,
  /// RowWiseAdagrad, SparseSgd, ... made for this layer's table): dparams and dx as backward(),
  /// the value gradient applied at once and never stored — the table ends as after backward()
  /// into an empty SparseRowGrad and value_optimizer.step(values(), grad), bit for bit. Returns
  /// the value gradient's norm before clipping. Refuses what step() refuses, with nothing
  /// changed (table, optimizer, dparams, dx).
  template <class Optimizer>
  double backward_fused(const ConstMatrixRef<Scalar>& x, const Cache& cache,
                        const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                        Optimizer& value_optimizer, MatrixRef<Scalar> dx) {
    return self_mut().backward_fused_core(x, cache, dout, dparams, value_optimizer, &dx);
  }
  template <class Optimizer>
  double backward_fused(const ConstMatrixRef<Scalar>& x, const Cache& cache,
                        const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                        Optimizer& value_optimizer) {
    return self_mut().backward_fused_core(x, cache, dout, dparams, value_optimizer, nullptr);
  }
  /// With dx of any layout.
  template <class Optimizer, class Dx,
            std::enable_if_t<!std::is_convertible_v<Dx&, MatrixRef<Scalar>>, int> = 0>
  double backward_fused(const ConstMatrixRef<Scalar>& x, const Cache& cache,
                        const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                        Optimizer& value_optimizer, const Eigen::MatrixBase<Dx>& dx) {
    RowMatrix<Scalar> rows(dx.rows(), dx.cols());
    MatrixRef<Scalar> ref(rows);
    const double norm =
        self_mut().backward_fused_core(x, cache, dout, dparams, value_optimizer, &ref);
    const_cast<Eigen::MatrixBase<Dx>&>(dx) = rows;
    return norm;
  }

 protected:
  LayerApi() = default;

 private:
  const Derived& self() const { return static_cast<const Derived&>(*this); }
  Derived& self_mut() { return static_cast<Derived&>(*this); }

  void sparse_backward(const ConstMatrixRef<Scalar>& x, const Cache& cache,
                       const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                       SparseRowGrad<Scalar>& dvalues, MatrixRef<Scalar>* dx) const {
    SparseRowGradSink<Scalar> sink(dvalues, cache.workspace.bag.local);
    self().backward_core(x, cache, dout, dparams, sink, dx);
    if (dvalues.empty()) dvalues.dim = self().value_width();
  }
};

}  // namespace pkm
