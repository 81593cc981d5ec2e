// pkm/layer_cache.hpp — what a memory layer's forward keeps for its backward (ForwardCache),
// the scratch its backward reuses, and the gradients it produces (LayerGradients). Shared by
// the single-process layer (memory_layer.hpp) and the memory-parallel one (pkm/distributed).
#pragma once

#include "pkm/config.hpp"
#include "pkm/embedding_bag.hpp"
#include "pkm/key_search.hpp"
#include "pkm/memory_output.hpp"
#include "pkm/packed_weights.hpp"
#include "pkm/parameters.hpp"
#include "pkm/sparse_grad.hpp"
#include "pkm/types.hpp"

namespace pkm {

/// Buffers the layer's backward reuses from call to call (held by the ForwardCache).
template <class Scalar>
struct LayerWorkspace {
  KeySearchWorkspace<Scalar> search;
  OutputWorkspace<Scalar> output;
  BagBackwardScratch<Scalar> bag;
  RowMatrix<Scalar> dy;      ///< B x v_dim: gradient of the read
  RowMatrix<Scalar> dscore;  ///< B x (H knn): gradient of the weights, then of the scores
  RowMatrix<Scalar> dq;      ///< B x (H k_dim): gradient of the query
};

/// What forward() keeps for backward(): the key search's results (indices, scores, weights,
/// ...) and the output op's (swilu_pre, hidden, pre_gate, gate), plus the query and the read.
/// Reuse one per layer and thread: its buffers are only reallocated when the batch size
/// changes, and backward() keeps its own temporaries in it (so a cache must not be used by
/// two backward calls at once).
template <class Scalar>
struct ForwardCache : KeySearchCache<Scalar>, OutputCache<Scalar> {
  MemoryConfig config{};                     ///< config of the layer that filled it
  Index batch = -1;                          ///< tokens of the last forward; -1 before the first
  RowMatrix<Scalar> query;                   ///< B x (H k_dim): q = Wq x + bq
  RowMatrix<Scalar> read;                    ///< B x v_dim: y = sum of weighted value rows
  ProductScratch products;                   ///< the packed bf16 weights, during a forward
  mutable LayerWorkspace<Scalar> workspace;  ///< scratch of forward and backward
};

/// Gradients of one layer: dense ones in a LayerParameters of the same config, the value
/// table's as a SparseRowGrad. backward() adds to them; zero() clears them.
template <class Scalar>
struct LayerGradients {
  LayerParameters<Scalar> params;
  SparseRowGrad<Scalar> values;

  LayerGradients() = default;
  explicit LayerGradients(const MemoryConfig& config) : params(config) {
    values.dim = config.v_dim;
  }
  void zero() {
    params.set_zero();
    values.clear();
  }
};

}  // namespace pkm
