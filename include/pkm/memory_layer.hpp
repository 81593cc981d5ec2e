// pkm/memory_layer.hpp — one product-key memory layer, a thin composition of ops:
//
//   query   q = Wq x + bq                                 linear.hpp
//   search  half scores -> exact top-k -> softmax weights  key_search.hpp
//   read    y = sum of weighted value rows                 embedding_bag.hpp
//   output  Memory+ / projection / gate                    memory_output.hpp
//
// and the backward of each, in reverse. Its dense parameters live in a LayerParameters (owned
// or viewing the caller's buffers), its value table in a ValueTable (owned, or a view of a
// table several layers share). forward() is const and keeps all per-call state in a
// caller-supplied ForwardCache, so one layer may run forward from several threads at once
// (one cache per thread).
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "pkm/config.hpp"
#include "pkm/detail/checks.hpp"
#include "pkm/detail/layer_core.hpp"
#include "pkm/detail/parallel.hpp"
#include "pkm/detail/vec_math.hpp"
#include "pkm/embedding_bag.hpp"
#include "pkm/init.hpp"
#include "pkm/layer_cache.hpp"
#include "pkm/parameters.hpp"
#include "pkm/sparse_grad.hpp"
#include "pkm/types.hpp"
#include "pkm/value_table.hpp"

namespace pkm {

/// A product-key memory layer with dense parameters of type Scalar (float for use, double for
/// gradient checks) reading a value table stored as TableT.
template <class Scalar, class TableT = Scalar>
class MemoryLayer {
  static_assert(std::is_floating_point_v<Scalar>, "pkm::MemoryLayer: Scalar must be float or double");

 public:
  using scalar_type = Scalar;
  using table_type = TableT;

  /// Owns all its parameters and its value table, initialised from `seed`.
  MemoryLayer(const MemoryConfig& config, std::uint64_t seed)
      : params_(config), values_(config.slots(), config.v_dim) {
    init_parameters(params_, seed);
    init_values(values_, seed);
  }

  /// Owns its dense parameters (initialised from `seed`) and reads `values`, typically a view
  /// of a table shared with other layers (`pool.view()`); pass an owning table with std::move.
  MemoryLayer(const MemoryConfig& config, ValueTable<TableT>&& values, std::uint64_t seed)
      : params_(config), values_(std::move(values)) {
    check_table();
    init_parameters(params_, seed);
  }

  /// Uses the given parameters and table as they are (each owned or a view).
  MemoryLayer(LayerParameters<Scalar> params, ValueTable<TableT>&& values)
      : params_(std::move(params)), values_(std::move(values)) {
    params_.config().validate();
    check_table();
  }

  const MemoryConfig& config() const { return params_.config(); }
  LayerParameters<Scalar>& params() { return params_; }
  const LayerParameters<Scalar>& params() const { return params_; }
  ValueTable<TableT>& values() { return values_; }
  const ValueTable<TableT>& values() const { return values_; }

  /// out = layer(x) for a batch of B tokens (x: B x input_dim, out: B x output_dim), filling
  /// `cache` for backward. A batch of 0 tokens is valid and does nothing.
  /// Throws, before writing anything, std::invalid_argument for a wrong shape or a
  /// non-finite input value and std::runtime_error for a non-finite dense parameter (naming
  /// the tensor and element). Then throws std::runtime_error for what finite values can still
  /// produce: a query or score that overflows, a value-table row that holds NaN or infinity
  /// (only the rows a token reads are checked, naming the row), an output that overflows (out
  /// then holds the overflowed values). After any throw the cache is marked unfilled: backward
  /// refuses it until a forward completes.
  void forward(const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> out,
               ForwardCache<Scalar>& cache) const;

  /// Convenience: returns the output as a new matrix.
  RowMatrix<Scalar> forward(const ConstMatrixRef<Scalar>& x, ForwardCache<Scalar>& cache) const {
    RowMatrix<Scalar> out(x.rows(), config().output_dim);
    forward(x, out, cache);
    return out;
  }

  // Other storage orders. pkm computes on row-major rows (one token per row). Inputs (x, dout)
  // of any Eigen layout are accepted by every overload: a column-major one is copied into a
  // row-major temporary by Eigen::Ref, B x input_dim values, small next to the layer's work.
  // Outputs (out, dx) of another layout — Eigen's default column-major matrices, or their
  // blocks — are written through a row-major temporary, copied out only when the call
  // succeeds (so a call that throws leaves them unchanged).

  /// forward into an output of any layout (see above).
  template <class Out, std::enable_if_t<!std::is_convertible_v<Out&, MatrixRef<Scalar>>, int> = 0>
  void forward(const ConstMatrixRef<Scalar>& x, const Eigen::MatrixBase<Out>& out,
               ForwardCache<Scalar>& cache) const {
    RowMatrix<Scalar> rows(out.rows(), out.cols());
    forward(x, rows, cache);
    const_cast<Eigen::MatrixBase<Out>&>(out) = rows;  // Eigen's idiom for writable expressions
  }
  /// backward with dx of any layout (see above).
  template <class Dx, std::enable_if_t<!std::is_convertible_v<Dx&, MatrixRef<Scalar>>, int> = 0>
  void backward(const ConstMatrixRef<Scalar>& x, const ForwardCache<Scalar>& cache,
                const ConstMatrixRef<Scalar>& dout, LayerGradients<Scalar>& grads,
                const Eigen::MatrixBase<Dx>& dx) const {
    RowMatrix<Scalar> rows(dx.rows(), dx.cols());
    backward(x, cache, dout, grads, MatrixRef<Scalar>(rows));
    const_cast<Eigen::MatrixBase<Dx>&>(dx) = rows;
  }
  template <class Dx, std::enable_if_t<!std::is_convertible_v<Dx&, MatrixRef<Scalar>>, int> = 0>
  void backward(const ConstMatrixRef<Scalar>& x, const ForwardCache<Scalar>& cache,
                const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                SparseRowGrad<Scalar>& dvalues, const Eigen::MatrixBase<Dx>& dx) const {
    RowMatrix<Scalar> rows(dx.rows(), dx.cols());
    backward(x, cache, dout, dparams, dvalues, MatrixRef<Scalar>(rows));
    const_cast<Eigen::MatrixBase<Dx>&>(dx) = rows;
  }

  /// Backward of the forward that filled `cache` with input `x` (the same x, and the same
  /// parameters). Adds the dense parameter gradients to `dparams` and merges the sparse value
  /// gradient into `dvalues`; writes the input gradient to `dx` (B x input_dim).
  /// Validates every argument before writing anything.
  void backward(const ConstMatrixRef<Scalar>& x, const ForwardCache<Scalar>& cache,
                const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                SparseRowGrad<Scalar>& dvalues, MatrixRef<Scalar> dx) const {
    backward_impl(x, cache, dout, dparams, dvalues, &dx);
  }
  /// As above, without the input gradient.
  void backward(const ConstMatrixRef<Scalar>& x, const ForwardCache<Scalar>& cache,
                const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                SparseRowGrad<Scalar>& dvalues) const {
    backward_impl(x, cache, dout, dparams, dvalues, nullptr);
  }
  void backward(const ConstMatrixRef<Scalar>& x, const ForwardCache<Scalar>& cache,
                const ConstMatrixRef<Scalar>& dout, LayerGradients<Scalar>& grads,
                MatrixRef<Scalar> dx) const {
    backward_impl(x, cache, dout, grads.params, grads.values, &dx);
  }
  void backward(const ConstMatrixRef<Scalar>& x, const ForwardCache<Scalar>& cache,
                const ConstMatrixRef<Scalar>& dout, LayerGradients<Scalar>& grads) const {
    backward_impl(x, cache, dout, grads.params, grads.values, nullptr);
  }

  /// Backward with the value table updated in place: the dense parameter gradients are
  /// added to `dparams` and dx written as by backward(), but the value gradient is applied
  /// straight away by `value_optimizer` (pkm::optim::LazyAdam, RowWiseAdagrad, ... made for
  /// this table) and never stored. The table ends as after backward() into an empty
  /// SparseRowGrad followed by value_optimizer.step(values(), grad), bit for bit. Returns the
  /// value gradient's norm before clipping. One call is one optimizer step: for a table
  /// shared by several layers, merge their gradients and step once instead (docs/training.md).
  /// It refuses what step() refuses, with nothing changed (table, optimizer, dparams, dx):
  /// a non-finite value gradient throws std::runtime_error whatever max_grad_norm is.
  template <class Optimizer>
  double backward_fused(const ConstMatrixRef<Scalar>& x, const ForwardCache<Scalar>& cache,
                        const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                        Optimizer& value_optimizer, MatrixRef<Scalar> dx);
  template <class Optimizer>
  double backward_fused(const ConstMatrixRef<Scalar>& x, const ForwardCache<Scalar>& cache,
                        const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                        Optimizer& value_optimizer);
  /// backward_fused with dx of any layout (written through a row-major temporary).
  template <class Optimizer, class Dx, std::enable_if_t<!std::is_convertible_v<Dx&, MatrixRef<Scalar>>, int> = 0>
  double backward_fused(const ConstMatrixRef<Scalar>& x, const ForwardCache<Scalar>& cache,
                        const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                        Optimizer& value_optimizer, const Eigen::MatrixBase<Dx>& dx) {
    RowMatrix<Scalar> rows(dx.rows(), dx.cols());
    MatrixRef<Scalar> ref(rows);
    const double norm = backward_fused_impl(x, cache, dout, dparams, value_optimizer, &ref);
    const_cast<Eigen::MatrixBase<Dx>&>(dx) = rows;
    return norm;
  }

 private:
  void check_table() const {
    const MemoryConfig& c = config();
    if (values_.rows() != c.slots() || values_.dim() != c.v_dim) {
      throw std::invalid_argument(
          "pkm::MemoryLayer: value table is " + std::to_string(values_.rows()) + " x " +
          std::to_string(values_.dim()) + ", expected n_keys^2 x v_dim = " +
          std::to_string(c.slots()) + " x " + std::to_string(c.v_dim));
    }
  }

  void check_backward_args(const char* who, const ConstMatrixRef<Scalar>& x,
                           const ForwardCache<Scalar>& cache, const ConstMatrixRef<Scalar>& dout,
                           const LayerParameters<Scalar>& dparams,
                           const SparseRowGrad<Scalar>* dvalues,
                           const MatrixRef<Scalar>* dx) const {
    detail::check_backward(who, params_, x, cache, dout, dparams, dx);
    const MemoryConfig& c = config();
    if (dvalues != nullptr) dvalues->validate(who, "dvalues", c.slots());
    if (dvalues != nullptr && !dvalues->empty() && dvalues->dim != c.v_dim) {
      throw std::invalid_argument(std::string(who) + ": dvalues.dim = " +
                                  std::to_string(dvalues->dim) + ", expected v_dim = " +
                                  std::to_string(c.v_dim));
    }
  }

  void backward_impl(const ConstMatrixRef<Scalar>& x, const ForwardCache<Scalar>& cache,
                     const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                     SparseRowGrad<Scalar>& dvalues, MatrixRef<Scalar>* dx) const;

  template <class Optimizer>
  double backward_fused_impl(const ConstMatrixRef<Scalar>& x, const ForwardCache<Scalar>& cache,
                             const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                             Optimizer& opt, MatrixRef<Scalar>* dx) {
    const char* who = "pkm::MemoryLayer::backward_fused";
    check_backward_args(who, x, cache, dout, dparams, nullptr, dx);
    opt.check_table(who, values_);  // before any gradient is written
    double norm = 0.0;
    backward_core(x, cache, dout, dparams, dx, [&](LayerWorkspace<Scalar>& ws) {
      if (!detail::all_finite(ws.dy.data(), ws.dy.size())) {
        throw std::runtime_error(std::string(who) +
                                 ": the gradient of the read (dout through the output op) is not finite "
                                 "although dout is: dout or the output op's parameters are too large; "
                                 "nothing was updated");
      }
      norm = embedding_bag_backward_update<TableT, Scalar>(values_, cache.indices, cache.weights, ws.dy,
                                                           ws.dscore, opt, ws.bag);
    });
    return norm;
  }

  /// The backward after validation: output op, read (read_backward(ws) writes ws.dscore from
  /// ws.dy and stores or applies the value gradient; it is the last step that may throw and
  /// runs before anything the caller owns is written), key search, query projection.
  template <class ReadBackward>
  void backward_core(const ConstMatrixRef<Scalar>& x, const ForwardCache<Scalar>& cache,
                     const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                     MatrixRef<Scalar>* dx, ReadBackward&& read_backward) const {
    if (cache.batch == 0) return;
    // The read's gradient first, without touching dparams: the fused read backward may
    // still refuse it, and then nothing at all has changed.
    read_backward(detail::backward_begin(params_, cache, dout));
    detail::backward_end(params_, x, cache, dout, dparams, dx);
  }

  LayerParameters<Scalar> params_;
  ValueTable<TableT> values_;
};

// The entry points that do the work are defined outside the class, so that they are not
// implicitly inline: an `extern template` declaration (pkm/precompiled.hpp) then keeps them
// — and the ops they call — from being compiled again in every translation unit.

template <class Scalar, class TableT>
void MemoryLayer<Scalar, TableT>::forward(const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> out,
                                          ForwardCache<Scalar>& cache) const {
  const char* who = "pkm::MemoryLayer::forward";
  detail::forward_begin(who, params_, x, out, cache);
  if (x.rows() > 0) {
    embedding_bag<TableT, Scalar>(values_, cache.indices, cache.weights, cache.read);
    detail::check_bag_read<TableT, Scalar>(who, values_, cache.indices, cache.read);
  }
  detail::forward_end(who, params_, x, out, cache);
}

template <class Scalar, class TableT>
template <class Optimizer>
double MemoryLayer<Scalar, TableT>::backward_fused(const ConstMatrixRef<Scalar>& x, const ForwardCache<Scalar>& cache,
                                                   const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                                                   Optimizer& value_optimizer, MatrixRef<Scalar> dx) {
  return backward_fused_impl(x, cache, dout, dparams, value_optimizer, &dx);
}

template <class Scalar, class TableT>
template <class Optimizer>
double MemoryLayer<Scalar, TableT>::backward_fused(const ConstMatrixRef<Scalar>& x, const ForwardCache<Scalar>& cache,
                                                   const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                                                   Optimizer& value_optimizer) {
  return backward_fused_impl(x, cache, dout, dparams, value_optimizer, nullptr);
}

template <class Scalar, class TableT>
void MemoryLayer<Scalar, TableT>::backward_impl(const ConstMatrixRef<Scalar>& x, const ForwardCache<Scalar>& cache,
                                                const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                                                SparseRowGrad<Scalar>& dvalues, MatrixRef<Scalar>* dx) const {
  check_backward_args("pkm::MemoryLayer::backward", x, cache, dout, dparams, &dvalues, dx);
  if (dvalues.empty()) dvalues.dim = config().v_dim;
  backward_core(x, cache, dout, dparams, dx, [&](LayerWorkspace<Scalar>& ws) {
    embedding_bag_backward<TableT, Scalar>(values_, cache.indices, cache.weights, ws.dy, ws.dscore, dvalues,
                                           ws.bag);
  });
}

}  // namespace pkm
