// pkm/layer_composition.hpp — the memory layer's composition of ops around its read, written
// once and shared by every layer (pkm/memory_layer.hpp, one table; the memory-parallel layer
// of pkm/distributed, column shards over processes), which differ only in how the read and
// its backward are done:
//
//   forward:  forward_begin (checks, query, search) -> read -> forward_end (output op)
//   backward: check_backward -> backward_begin (dy, the read's gradient) -> read backward
//             (writes dscore; hands the value gradient to a sink, pkm/value_gradient.hpp) ->
//             backward_end (output op weights, search, query, dx)
//
// A layer of another kind (another read: a quantized table, a table on another device) is
// these calls around its own read.
#pragma once

#include <string>

#include "pkm/config.hpp"
#include "pkm/detail/checks.hpp"
#include "pkm/detail/parallel.hpp"
#include "pkm/detail/vec_math.hpp"
#include "pkm/key_search.hpp"
#include "pkm/layer_cache.hpp"
#include "pkm/linear.hpp"
#include "pkm/memory_output.hpp"
#include "pkm/packed_weights.hpp"
#include "pkm/parameters.hpp"
#include "pkm/types.hpp"

namespace pkm::composition {

using pkm::detail::all_finite;
using pkm::detail::bias_or_null;
using pkm::detail::check_finite;
using pkm::detail::check_indices;
using pkm::detail::check_same_shape;
using pkm::detail::kTokenBlock;
using pkm::detail::parallel_blocks;

template <class Scalar>
void check_layer_input(const char* who, const MemoryConfig& c, const ConstMatrixRef<Scalar>& x,
                       bool finite) {
  if (x.cols() != c.input_dim) {
    throw std::invalid_argument(std::string(who) + ": x has " + std::to_string(x.cols()) +
                                " columns, expected input_dim = " + std::to_string(c.input_dim));
  }
  if (finite) check_finite(who, "x", x);
}

/// The forward up to the read: validates x, out and the parameters (before writing anything),
/// marks the cache unfilled, then computes the query and the key search (indices, weights).
template <class Scalar>
void forward_begin(const char* who, const LayerParameters<Scalar>& p,
                   const ConstMatrixRef<Scalar>& x, const MatrixRef<Scalar>& out,
                   ForwardCache<Scalar>& cache) {
  const MemoryConfig& c = p.config();
  check_layer_input(who, c, x, true);
  check_same_shape(who, "out", out.rows(), out.cols(), x.rows(), c.output_dim);
  check_parameters_finite(who, p);
  const Index B = x.rows();
  cache.batch = -1;  // the cache is valid again only when the forward completes
  cache.config = c;
  cache.query.resize(B, c.heads * c.k_dim);
  cache.read.resize(B, c.v_dim);
  // The packed bf16 weights where the products are bf16 ones (made once per change of p).
  cache.products.packed = packed_weights(p);
  linear_forward<Scalar>(x, p.query_weight(), bias_or_null(p, Tensor::query_bias), cache.query,
                         c.compute, cache.products.of(Tensor::query_weight), &cache.products.x_pack);
  key_search_forward<Scalar>(c, p.keys(), cache.query, cache, cache.workspace.search,
                             cache.products.key_halves());
}

/// The forward after the read (cache.read filled): the output op, its overflow check, and the
/// cache marked filled.
template <class Scalar>
void forward_end(const char* who, const LayerParameters<Scalar>& p, const ConstMatrixRef<Scalar>& x,
                 MatrixRef<Scalar> out, ForwardCache<Scalar>& cache) {
  const Index B = x.rows();
  output_forward<Scalar>(p, x, cache.read, out, cache, &cache.products);
  cache.products.packed.reset();  // a later change of p may free them
  parallel_blocks(B, kTokenBlock, [&](Index b0, Index b1) {
    for (Index b = b0; b < b1; ++b) {
      if (!all_finite(out.row(b).data(), out.cols())) {
        throw std::runtime_error(std::string(who) + ": the output of token " + std::to_string(b) +
                                 " is not finite although x, the parameters and the read are: the "
                                 "output op (Memory+, projection or gate) overflows; out holds the "
                                 "overflowed values");
      }
    }
  });
  cache.batch = B;
}

/// The backward's checks that do not depend on how the value table is stored.
template <class Scalar>
void check_backward(const char* who, const LayerParameters<Scalar>& p,
                    const ConstMatrixRef<Scalar>& x, const ForwardCache<Scalar>& cache,
                    const ConstMatrixRef<Scalar>& dout, const LayerParameters<Scalar>& dparams,
                    const MatrixRef<Scalar>* dx) {
  const MemoryConfig& c = p.config();
  if (cache.batch < 0 || cache.config != c) {
    throw std::invalid_argument(
        std::string(who) +
        ": cache was not filled by a completed forward() of a layer with this config");
  }
  check_layer_input(who, c, x, false);
  if (x.rows() != cache.batch) {
    throw std::invalid_argument(std::string(who) + ": x has " + std::to_string(x.rows()) +
                                " rows, expected the forward batch of " +
                                std::to_string(cache.batch));
  }
  check_same_shape(who, "dout", dout.rows(), dout.cols(), cache.batch, c.output_dim);
  check_finite(who, "dout", dout);
  check_parameters_match(dparams, c, "parameter gradients (dparams)");
  if (dx != nullptr) check_same_shape(who, "dx", dx->rows(), dx->cols(), cache.batch, c.input_dim);
  check_indices(who, cache.indices, c.slots());
}

/// The backward up to the read's: sizes the workspace and writes ws.dy, the read's gradient.
/// Writes nothing the caller owns.
template <class Scalar>
LayerWorkspace<Scalar>& backward_begin(const LayerParameters<Scalar>& p,
                                       const ForwardCache<Scalar>& cache,
                                       const ConstMatrixRef<Scalar>& dout) {
  const MemoryConfig& c = p.config();
  const Index B = cache.batch;
  LayerWorkspace<Scalar>& ws = cache.workspace;
  ws.dy.resize(B, c.v_dim);
  ws.dscore.resize(B, c.bag_size());
  ws.dq.resize(B, c.heads * c.k_dim);
  if (B > 0) output_backward<Scalar>(p, cache.read, cache, dout, ws.dy, ws.output);
  return ws;
}

/// The backward after the read's (ws.dscore holds the gradient of the weights): adds the dense
/// gradients to dparams and writes dx.
template <class Scalar>
void backward_end(const LayerParameters<Scalar>& p, const ConstMatrixRef<Scalar>& x,
                  const ForwardCache<Scalar>& cache, const ConstMatrixRef<Scalar>& dout,
                  LayerParameters<Scalar>& dparams, MatrixRef<Scalar>* dx) {
  if (cache.batch == 0) return;
  const MemoryConfig& c = p.config();
  LayerWorkspace<Scalar>& ws = cache.workspace;
  output_backward_weights<Scalar>(p, x, cache.read, cache, dout, ws.output, dparams);
  key_search_backward<Scalar>(c, p.keys(), cache.query, cache, ws.dscore, ws.dq, dparams.keys(),
                              ws.search);
  linear_backward_weights<Scalar>(x, ws.dq, dparams.query_weight(),
                                  bias_or_null(dparams, Tensor::query_bias), c.compute);
  if (dx != nullptr) {
    linear_backward_input<Scalar>(ws.dq, p.query_weight(), *dx, false, c.compute);
    output_backward_input<Scalar>(p, ws.output, *dx);
  }
}

}  // namespace pkm::composition
