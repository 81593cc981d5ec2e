// pkm/distributed/memory_parallel_layer.hpp — a memory layer whose value table is split by
// columns over a group of processes (memory parallelism, "Memory Layers at Scale" §
// parallelism). Each process has its own tokens and full copies of the dense parameters (keys,
// query, W1, W2, gate), and holds every table row's columns [begin(rank), end(rank)). Its API
// mirrors pkm::MemoryLayer; every call is collective (all processes of the group make it, in
// the same order, each with its own tokens — any number, 0 included).
//
// The composition is the single-process layer's (pkm/layer_composition.hpp) and so is its API
// (pkm::LayerApi, pkm/layer_api.hpp); only the read differs (pkm/distributed/sharded_read.hpp). The
// forward's output is bitwise the single-process layer's on the same tokens; the backward equals it
// up to rounding (the dot products <dy, V[idx]> are summed shard by shard) and is bitwise the same
// from run to run for a given split. The dense parameter gradients are each process's own tokens'
// (as with data parallelism): sum them over the group with sum_gradients(), or leave that to your
// data-parallel engine.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "pkm/config.hpp"
#include "pkm/distributed/column_shards.hpp"
#include "pkm/distributed/group.hpp"
#include "pkm/distributed/sharded_read.hpp"
#include "pkm/init.hpp"
#include "pkm/layer_api.hpp"
#include "pkm/layer_cache.hpp"
#include "pkm/layer_composition.hpp"
#include "pkm/parameters.hpp"
#include "pkm/sparse_grad.hpp"
#include "pkm/types.hpp"
#include "pkm/value_table.hpp"

namespace pkm::distributed {

/// The layer's ForwardCache plus what the sharded read keeps (the group's slot ids and
/// weights). One per layer and thread of control, as ForwardCache.
template <class Scalar>
struct ParallelForwardCache : ForwardCache<Scalar> {
  mutable ShardedReadCache<Scalar> shard;  ///< the backward reuses its buffers
};

template <class Scalar, class TableT = Scalar>
class MemoryParallelLayer
    : public LayerApi<MemoryParallelLayer<Scalar, TableT>, Scalar, ParallelForwardCache<Scalar>> {
  static_assert(std::is_floating_point_v<Scalar>,
                "pkm::distributed::MemoryParallelLayer: Scalar must be float or double");
  friend class LayerApi<MemoryParallelLayer<Scalar, TableT>, Scalar, ParallelForwardCache<Scalar>>;

 public:
  using scalar_type = Scalar;
  using table_type = TableT;

  /// Collective. Dense parameters initialised from `seed` as MemoryLayer(config, seed) does,
  /// and this process's columns of the table that layer would have (bit for bit). The
  /// processes must pass the same config, split and seed (checked: a fingerprint of the
  /// config, split, types and parameters is compared over the group).
  MemoryParallelLayer(const Group& group, const MemoryConfig& config, const ColumnShards& shards,
                      std::uint64_t seed)
      : group_(&group), shards_(shards) {
    group.collectively(kWho, Op::construct, [&] {
      config.validate();
      check_split(config);
      params_ = LayerParameters<Scalar>(config);
      init_parameters(params_, seed);
      const int r = group.rank();
      values_ = ValueTable<TableT>(config.slots(), shards.width(r));
      init_value_columns(values_, seed, config.v_dim, shards.begin(r));
    });
    require_same_layer();
  }

  /// Collective. Uses the given parameters (the same on every process) and this process's
  /// columns of the table (config.slots() x shards.width(rank), owned or a view of the
  /// caller's memory).
  MemoryParallelLayer(const Group& group, LayerParameters<Scalar> params,
                      ValueTable<TableT>&& shard, const ColumnShards& shards)
      : group_(&group), params_(std::move(params)), values_(std::move(shard)), shards_(shards) {
    group.collectively(kWho, Op::construct, [&] {
      params_.config().validate();
      check_split(params_.config());
      if (values_.rows() != params_.config().slots()) {
        throw std::invalid_argument(
            std::string(kWho) + ": the table shard has " + std::to_string(values_.rows()) +
            " rows, expected n_keys^2 = " + std::to_string(params_.config().slots()));
      }
      detail::check_shard(kWho, group, shards_, values_);
    });
    require_same_layer();
  }

  const MemoryConfig& config() const { return params_.config(); }
  LayerParameters<Scalar>& params() { return params_; }
  const LayerParameters<Scalar>& params() const { return params_; }
  /// This process's columns of the table.
  ValueTable<TableT>& values() { return values_; }
  const ValueTable<TableT>& values() const { return values_; }
  const ColumnShards& shards() const { return shards_; }
  const Group& group() const { return *group_; }
  Index column_begin() const { return shards_.begin(group_->rank()); }
  Index column_end() const { return shards_.end(group_->rank()); }

  /// Gradients for this layer: dense ones of the config, the value gradient's rows this
  /// process's width.
  LayerGradients<Scalar> make_gradients() const {
    LayerGradients<Scalar> g(config());
    g.values.dim = values_.dim();
    return g;
  }

  /// The table's rows and this process's width (LayerApi's value gradients are of this shape).
  Index value_rows() const { return values_.rows(); }
  Index value_width() const { return values_.dim(); }

  // forward, backward, backward_to and backward_fused are LayerApi's (pkm/layer_api.hpp), as
  // MemoryLayer's, each collective: every process of the group calls it with its own tokens
  // (any number, 0 included). The dense gradients are this process's tokens'; the value
  // gradient (or the fused step) is of this process's columns, from every token of the group;
  // backward_fused returns the whole table gradient's norm.

  /// One step of `value_optimizer` (made for values()) from dshard, as backward() makes it;
  /// the group's step of the whole table (see pkm::distributed::sharded_step). Collective.
  template <class Optimizer>
  double step(Optimizer& value_optimizer, const SparseRowGrad<Scalar>& dshard) {
    return sharded_step(*group_, shards_, value_optimizer, values_, dshard);
  }

  /// dparams <- its sum over the group, every element added in process order (the same
  /// bits on every process): data parallelism's gradient all-reduce for the dense
  /// parameters, if your own engine does not do it. Collective.
  void sum_gradients(LayerParameters<Scalar>& dparams) const {
    const char* who = "pkm::distributed::MemoryParallelLayer::sum_gradients";
    group_->collectively(who, Op::sum,
                         [&] { check_parameters_match(dparams, config(), "dparams"); });
    dparams.for_each(
        [&](Tensor, MatrixMap<Scalar> m) { group_->sum_ordered(who, m.data(), m.size()); });
  }

 private:
  static constexpr const char* kWho = "pkm::distributed::MemoryParallelLayer";

  void check_split(const MemoryConfig& c) const {
    if (shards_.v_dim() != c.v_dim) {
      throw std::invalid_argument(
          std::string(kWho) + ": the column split covers " + std::to_string(shards_.v_dim()) +
          " columns (" + shards_.to_string() + "), expected v_dim = " + std::to_string(c.v_dim));
    }
    if (shards_.ranks() != group_->size()) {
      throw std::invalid_argument(
          std::string(kWho) + ": the column split has " + std::to_string(shards_.ranks()) +
          " shards, expected one per process (" + std::to_string(group_->size()) + ")");
    }
  }

  /// Every process must hold the same layer: config, split, types and dense parameters.
  void require_same_layer() const {
    detail::Fingerprint config, split, types, values;
    config.add_fields(this->config().fields());
    split.add(shards_.to_string());
    types.add(dtype_of<Scalar>()).add(dtype_of<TableT>());
    params_.for_each([&](Tensor, ConstMatrixMap<Scalar> m) {
      values.add_bytes(m.data(), static_cast<std::size_t>(m.size()) * sizeof(Scalar));
    });
    group_->require_same(kWho, {{"the layer's config", config.value()},
                                {"the layer's column split", split.value()},
                                {"the layer's parameter and table types", types.value()},
                                {"the layer's dense parameter values", values.value()}});
  }

  void forward_core(const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> out,
                    ParallelForwardCache<Scalar>& cache) const {
    const char* who = "pkm::distributed::MemoryParallelLayer::forward";
    group_->collectively(who, Op::layer_forward,
                         [&] { composition::forward_begin(who, params_, x, out, cache); });
    sharded_embedding_bag<TableT, Scalar>(*group_, shards_, values_, cache.indices, cache.weights,
                                          cache.read, cache.shard);
    group_->collectively(who, Op::layer_forward_end,
                         [&] { composition::forward_end(who, params_, x, out, cache); });
  }

  template <class Sink>
  void backward_core(const ConstMatrixRef<Scalar>& x, const ParallelForwardCache<Scalar>& cache,
                     const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                     Sink& sink, MatrixRef<Scalar>* dx) const {
    const char* who = "pkm::distributed::MemoryParallelLayer::backward";
    group_->collectively(who, Op::layer_backward, [&] {
      composition::check_backward(who, params_, x, cache, dout, dparams, dx);
      check_sink(sink, who, values_.rows(), values_.dim());
    });
    LayerWorkspace<Scalar>& ws = composition::backward_begin(params_, cache, dout);
    sharded_embedding_bag_backward_to<TableT, Scalar>(*group_, shards_, values_, ws.dy, ws.dscore,
                                                      sink, cache.shard);
    composition::backward_end(params_, x, cache, dout, dparams, dx);
  }

  template <class Optimizer>
  double backward_fused_core(const ConstMatrixRef<Scalar>& x,
                             const ParallelForwardCache<Scalar>& cache,
                             const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                             Optimizer& opt, MatrixRef<Scalar>* dx) {
    const char* who = "pkm::distributed::MemoryParallelLayer::backward_fused";
    group_->collectively(who, Op::layer_backward, [&] {
      composition::check_backward(who, params_, x, cache, dout, dparams, dx);
    });
    LayerWorkspace<Scalar>& ws = composition::backward_begin(params_, cache, dout);
    const double norm = sharded_embedding_bag_backward_update<TableT, Scalar>(
        *group_, shards_, values_, ws.dy, ws.dscore, opt, cache.shard);
    composition::backward_end(params_, x, cache, dout, dparams, dx);
    return norm;
  }

  const Group* group_;
  LayerParameters<Scalar> params_;
  ValueTable<TableT> values_;
  ColumnShards shards_;
};

}  // namespace pkm::distributed
