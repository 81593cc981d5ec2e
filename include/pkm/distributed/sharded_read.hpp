// pkm/distributed/sharded_read.hpp — the embedding bag over a value table whose columns are
// split over a group of processes (memory parallelism, as "Memory Layers at Scale" shards
// its tables), forward and backward. Each process has its own tokens; process r holds every
// row's columns [begin(r), end(r)) (ColumnShards).
//
// forward:  all-gather the tokens' slot ids and weights; each process reads its columns for
//           every token of the group; an all-to-all returns to each process the whole read
//           of its own tokens. Each column is summed over the same bag in the same order as
//           the single-process embedding_bag: the read is bitwise the same.
// backward: an all-to-all sends each process the dy columns of every token for its columns;
//           each process forms its columns' sparse value gradient (or applies it with a
//           sparse optimizer) and the partial dot products <dy, V[idx]> over its columns,
//           which a reduce-scatter (fixed order) sums back to each token's process.
//
// Every function here is collective: all processes of the group call it, in the same order.
// A bad argument on any process makes every process throw (Group::collectively).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "pkm/detail/checks.hpp"
#include "pkm/distributed/column_shards.hpp"
#include "pkm/distributed/group.hpp"
#include "pkm/embedding_bag.hpp"
#include "pkm/optim/sparse_optimizer.hpp"
#include "pkm/optim/state.hpp"
#include "pkm/sparse_grad.hpp"
#include "pkm/value_gradient.hpp"
#include "pkm/types.hpp"
#include "pkm/value_table.hpp"

namespace pkm::distributed {

/// What the sharded forward keeps for its backward, and the buffers both reuse.
template <class S>
struct ShardedReadCache {
  bool filled = false;        ///< set by a completed forward
  std::vector<Index> counts;  ///< tokens of each process in the last forward
  IndexMatrix indices;   ///< the group's tokens' slot ids, process by process (sum(counts) x bag)
  RowMatrix<S> weights;  ///< and their weights
  /// sum(counts) x width: this process's columns of the read (forward), of dy (backward)
  RowMatrix<S> part;
  RowMatrix<S> dweights;  ///< sum(counts) x bag: <dy, V[idx]> over this process's columns
  std::vector<S> buffer, scratch;
  BagBackwardScratch<S> bag;
};

/// Bytes one process sends to the others per token of its own, in one forward and one
/// backward of a sharded read of `bag` slots per token, `width` of the v_dim columns held
/// here, `scalar_bytes` per weight / read value (docs/distributed.md derives these):
///   forward:  (P-1) bag (8 + s)    ids and weights, all-gathered
///           + (P-1) width s        this process's columns of the others' tokens' reads
///   backward: (v_dim - width) s    its tokens' dy columns of the others' shards
///           + (P-1) bag s          partial dot products for the others' tokens
/// (with equal batches on every process). Group::bytes_sent() measures the same.
struct ShardTraffic {
  double forward = 0, backward = 0;
};
inline ShardTraffic shard_traffic_per_token(Index bag, Index v_dim, Index width, int ranks,
                                            double scalar_bytes = 4) {
  const double P1 = ranks - 1;
  ShardTraffic t;
  t.forward = P1 * double(bag) * (8.0 + scalar_bytes) + P1 * double(width) * scalar_bytes;
  t.backward = double(v_dim - width) * scalar_bytes + P1 * double(bag) * scalar_bytes;
  return t;
}

namespace detail {
template <class T>
void check_shard(const char* who, const Group& group, const ColumnShards& shards,
                 const ValueTable<T>& shard) {
  if (shards.ranks() != group.size()) {
    throw std::invalid_argument(
        std::string(who) + ": the column split has " + std::to_string(shards.ranks()) +
        " shards, expected one per process of the group (" + std::to_string(group.size()) + ")");
  }
  const Index w = shards.width(group.rank());
  if (shard.dim() != w) {
    throw std::invalid_argument(
        std::string(who) + ": this process's table shard has " + std::to_string(shard.dim()) +
        " columns, expected " + std::to_string(w) + " (columns [" +
        std::to_string(shards.begin(group.rank())) + ", " +
        std::to_string(shards.end(group.rank())) + ") of " + std::to_string(shards.v_dim()) + ")");
  }
}

inline std::string shard_note(const Group& g, const ColumnShards& s) {
  return " (process " + std::to_string(g.rank()) + " reads columns [" +
         std::to_string(s.begin(g.rank())) + ", " + std::to_string(s.end(g.rank())) +
         "); tokens are numbered over the group, process by process)";
}

/// Sends each process q this process's dy columns [begin(q), end(q)) for its tokens, and
/// receives into cache.part every token's dy over this process's columns (process order).
template <class S>
void exchange_dy(const char* who, const Group& g, const ColumnShards& s,
                 const ConstMatrixRef<S>& dy, ShardedReadCache<S>& cache) {
  const int P = g.size(), me = g.rank();
  const Index mine = cache.counts[static_cast<std::size_t>(me)], w = s.width(me);
  Index total = 0;
  for (Index c : cache.counts) total += c;
  cache.buffer.resize(static_cast<std::size_t>(mine * s.v_dim()));
  std::vector<Index> send(static_cast<std::size_t>(P)), recv(static_cast<std::size_t>(P));
  S* out = cache.buffer.data();
  for (int q = 0; q < P; ++q) {
    const Index wq = s.width(q);
    for (Index b = 0; b < mine; ++b) {
      for (Index j = 0; j < wq; ++j) out[b * wq + j] = dy(b, s.begin(q) + j);
    }
    out += mine * wq;
    send[q] = mine * wq;
    recv[q] = cache.counts[static_cast<std::size_t>(q)] * w;
  }
  cache.part.resize(total, w);
  g.alltoallv(who, cache.buffer.data(), send, cache.part.data(), recv);
}

/// Sums the partial dot products (cache.dweights, every token of the group) over the group
/// into this process's tokens' dweights, in process order.
template <class S>
void reduce_dweights(const char* who, const Group& g, ShardedReadCache<S>& cache,
                     MatrixRef<S> dweights) {
  const Index bag = cache.dweights.cols();
  std::vector<Index> counts(cache.counts.size());
  for (std::size_t q = 0; q < counts.size(); ++q) counts[q] = cache.counts[q] * bag;
  const Index mine = cache.counts[static_cast<std::size_t>(g.rank())];
  RowMatrix<S> sum(mine, bag);
  g.reduce_scatter_ordered(who, cache.dweights.data(), counts, sum.data(), cache.scratch);
  dweights = sum;
}

template <class S>
void check_backward_args(const char* who, const Group& g, const ColumnShards& s,
                         const ShardedReadCache<S>& cache, const ConstMatrixRef<S>& dy,
                         const MatrixRef<S>& dweights) {
  if (!cache.filled || static_cast<int>(cache.counts.size()) != g.size()) {
    throw std::invalid_argument(std::string(who) +
                                ": the cache was not filled by a completed sharded forward");
  }
  const Index mine = cache.counts[static_cast<std::size_t>(g.rank())];
  pkm::detail::check_same_shape(who, "dy", dy.rows(), dy.cols(), mine, s.v_dim());
  pkm::detail::check_same_shape(who, "dweights", dweights.rows(), dweights.cols(), mine,
                                cache.indices.cols());
  pkm::detail::check_finite(who, "dy", dy);
}
}  // namespace detail

/// out (B x v_dim) = the embedding bag of this process's B tokens (indices, weights: B x bag)
/// over the whole table, from every process's columns. `shard` is this process's columns
/// (rows x shards.width(rank)). Collective. Fills `cache` for the backward.
template <class T, class S = pkm::detail::accumulator_t<T>>
void sharded_embedding_bag(const Group& group, const ColumnShards& shards,
                           const ValueTable<T>& shard, const ConstIndexRef& indices,
                           const ConstMatrixRef<pkm::detail::no_deduce<S>>& weights,
                           MatrixRef<pkm::detail::no_deduce<S>> out, ShardedReadCache<S>& cache) {
  const char* who = "pkm::distributed::sharded_embedding_bag";
  const int P = group.size(), me = group.rank();
  const Index bag = indices.cols();
  cache.filled = false;
  group.collectively(who, Op::read, [&] {
    detail::check_shard(who, group, shards, shard);
    pkm::detail::check_same_shape(who, "weights", weights.rows(), weights.cols(), indices.rows(),
                                  bag);
    pkm::detail::check_same_shape(who, "out", out.rows(), out.cols(), indices.rows(),
                                  shards.v_dim());
    pkm::detail::check_indices(who, indices, shard.rows());
    pkm::detail::check_finite(who, "weights", weights);
  });
  group.require_same(
      who, "the bag size, the table's rows and the column split",
      detail::Fingerprint().add(bag).add(shard.rows()).add(shards.to_string()).value());
  cache.counts = group.allgather_count(who, indices.rows());
  Index total = 0;
  std::vector<Index> n(static_cast<std::size_t>(P));
  for (int q = 0; q < P; ++q) {
    total += cache.counts[q];
    n[q] = cache.counts[q] * bag;
  }
  cache.indices.resize(total, bag);
  cache.weights.resize(total, bag);
  const IndexMatrix my_indices = indices;  // contiguous rows (B x bag, small)
  const RowMatrix<S> my_weights = weights;
  group.allgatherv(who, my_indices.data(), n, cache.indices.data());
  group.allgatherv(who, my_weights.data(), n, cache.weights.data());
  const Index w = shard.dim(), mine = cache.counts[static_cast<std::size_t>(me)];
  cache.part.resize(total, w);
  group.collectively(who, Op::read_check, [&] {
    if (total == 0) return;
    embedding_bag<T, S>(shard, cache.indices, cache.weights, cache.part);
    pkm::detail::check_bag_read<T, S>(who, shard, cache.indices, cache.part,
                                      detail::shard_note(group, shards));
  });
  std::vector<Index> send(static_cast<std::size_t>(P)), recv(static_cast<std::size_t>(P));
  for (int q = 0; q < P; ++q) {
    send[q] = cache.counts[q] * w;
    recv[q] = mine * shards.width(q);
  }
  cache.buffer.resize(static_cast<std::size_t>(mine * shards.v_dim()));
  group.alltoallv(who, cache.part.data(), send, cache.buffer.data(), recv);
  for (int q = 0; q < P; ++q) {
    const S* block = cache.buffer.data() + mine * shards.begin(q);
    const Index wq = shards.width(q), c0 = shards.begin(q);
    for (Index b = 0; b < mine; ++b) {
      for (Index j = 0; j < wq; ++j) out(b, c0 + j) = block[b * wq + j];
    }
  }
  cache.filled = true;
}

/// Backward of sharded_embedding_bag into a value-gradient sink (pkm/value_gradient.hpp):
/// dweights (B x bag) of this process's tokens, and the gradient of this process's columns
/// from every token of the group handed to `sink` (rows of shards.width(rank) values; the row
/// ids are the same on every process). The sink's check runs with the other checks, on every
/// process. Collective.
template <class T, class S = pkm::detail::accumulator_t<T>, class Sink>
void sharded_embedding_bag_backward_to(const Group& group, const ColumnShards& shards,
                                       const ValueTable<T>& shard,
                                       const ConstMatrixRef<pkm::detail::no_deduce<S>>& dy,
                                       MatrixRef<pkm::detail::no_deduce<S>> dweights, Sink&& sink,
                                       ShardedReadCache<S>& cache) {
  const char* who = "pkm::distributed::sharded_embedding_bag_backward";
  group.collectively(who, Op::read_backward, [&] {
    detail::check_shard(who, group, shards, shard);
    detail::check_backward_args<S>(who, group, shards, cache, dy, dweights);
    check_sink(sink, who, shard.rows(), shard.dim());
  });
  detail::exchange_dy<S>(who, group, shards, dy, cache);
  cache.dweights.resize(cache.part.rows(), cache.indices.cols());
  embedding_bag_backward_to<T, S>(shard, cache.indices, cache.weights, cache.part, cache.dweights,
                                  sink, cache.bag);
  detail::reduce_dweights<S>(who, group, cache, dweights);
}

/// As above, the gradient of this process's columns merged into `dshard` (a SparseRowGrad of
/// rows of shards.width(rank)).
template <class T, class S = pkm::detail::accumulator_t<T>>
void sharded_embedding_bag_backward(const Group& group, const ColumnShards& shards,
                                    const ValueTable<T>& shard,
                                    const ConstMatrixRef<pkm::detail::no_deduce<S>>& dy,
                                    MatrixRef<pkm::detail::no_deduce<S>> dweights,
                                    SparseRowGrad<pkm::detail::no_deduce<S>>& dshard,
                                    ShardedReadCache<S>& cache) {
  sharded_embedding_bag_backward_to<T, S>(group, shards, shard, dy, dweights,
                                          SparseRowGradSink<S>(dshard, cache.bag.local, "dshard"),
                                          cache);
  if (dshard.empty()) dshard.dim = shard.dim();
}

/// How a sparse optimizer's step over `group` sums what it computes over whole rows (the
/// gradient norm, row-wise Adagrad's statistic): in process order, the same bits everywhere.
inline optim::ShardReduction shard_reduction(const Group& group, Index full_dim) {
  const Group* g = &group;
  return {[g](double* data, Index n) {
            g->sum_ordered("pkm::distributed (an optimizer step)", data, n);
          },
          full_dim};
}

namespace detail {
template <class Optimizer, class T>
void check_step_args(const char* who, const Optimizer& opt, const ValueTable<T>& shard) {
  opt.check_table(who, shard);
  optim::detail::check_step_counter(who, opt.steps());
}

/// Collective: the processes step their columns of the same rows together, so their value
/// optimizers must be the same optimizer in the same state: the same kind and scalar type,
/// the same options (learning rate, betas, eps, weight decay, clipping), the same step count
/// (one process stepping on its own leaves the others behind), the same table rows and the
/// same row mask (or none; a process's own mask from its own tokens would update different
/// rows in different columns: select from counts summed over the group instead). Throws
/// std::invalid_argument on every process, naming what differs, before anything changes.
template <class Optimizer>
void require_same_optimizer(const char* who, const Group& group, const Optimizer& opt) {
  Fingerprint kind, options, steps, rows, mask;
  kind.add(std::string(opt.name())).add(sizeof(typename Optimizer::scalar_type));
  options.add_fields(opt.options().fields());
  steps.add(opt.steps());
  rows.add(opt.rows());
  const RowMask* m = opt.row_mask();
  mask.add(m != nullptr ? m->size() : std::int64_t(-1));
  if (m != nullptr && m->size() > 0)
    mask.add_bytes(m->rows().data(), m->rows().size() * sizeof(std::int64_t));
  group.require_same(
      who, {{"the value optimizer's kind", kind.value()},
            {"the value optimizer's options (lr, betas, eps, weight decay, max_grad_norm)",
             options.value()},
            {"the value optimizer's step count", steps.value()},
            {"the value optimizer's table rows", rows.value()},
            {"the value optimizer's row mask (every process must set the same mask, or none)",
             mask.value()}});
}
}  // namespace detail

/// The backward fused with a sparse optimizer made for this process's shard: dweights as
/// above, and this process's columns updated at once (nothing stored). Together the
/// processes take one step of the whole table: the clipping norm (and row-wise Adagrad's
/// mean of g^2 over a row) are summed over the group, so the step equals the single-process
/// step up to rounding. Returns the gradient's norm (the whole table's) before clipping.
/// Collective; refuses what the single-process fused backward refuses, on every process,
/// with nothing changed.
template <class T, class S = pkm::detail::accumulator_t<T>, class Optimizer>
double sharded_embedding_bag_backward_update(const Group& group, const ColumnShards& shards,
                                             ValueTable<T>& shard,
                                             const ConstMatrixRef<pkm::detail::no_deduce<S>>& dy,
                                             MatrixRef<pkm::detail::no_deduce<S>> dweights,
                                             Optimizer& optimizer, ShardedReadCache<S>& cache) {
  static_assert(std::is_same_v<typename Optimizer::scalar_type, S>,
                "pkm::distributed::sharded_embedding_bag_backward_update: the optimizer's scalar "
                "type must be S");
  const char* who = "pkm::distributed::sharded_embedding_bag_backward_update";
  group.collectively(who, Op::read_backward_update, [&] {
    detail::check_shard(who, group, shards, shard);
    detail::check_backward_args<S>(who, group, shards, cache, dy, dweights);
    detail::check_step_args(who, optimizer, shard);
  });
  detail::require_same_optimizer(who, group, optimizer);
  detail::exchange_dy<S>(who, group, shards, dy, cache);
  cache.dweights.resize(cache.part.rows(), cache.indices.cols());
  pkm::detail::bag_backward_begin<T, S>(who, shard, cache.indices, cache.weights, cache.part,
                                        cache.dweights, cache.bag);
  // The update may skip its separate finiteness pass only where every process may.
  double unsafe =
      pkm::detail::gradient_known_finite<S>(cache.weights, cache.part, shards.v_dim()) ? 0.0 : 1.0;
  group.sum_ordered(who, &unsafe, 1);
  const optim::ShardReduction reduction = shard_reduction(group, shards.v_dim());
  const RowMatrix<S>& part = cache.part;
  const double norm = optimizer.step_segments(
      shard, cache.bag.items, cache.bag.segments,
      [&](std::int64_t token, std::int64_t) { return part.row(token).data(); }, unsafe == 0.0,
      &reduction);
  detail::reduce_dweights<S>(who, group, cache, dweights);
  return norm;
}

/// One optimizer step of a sharded table from a gradient of this process's columns (as
/// sharded_embedding_bag_backward or the memory-parallel layer's backward make it: the same
/// row ids on every process). Equals the single-process step of the whole table up to
/// rounding (norm and row statistics summed over the group). Returns the whole gradient's
/// norm before clipping. Collective.
template <class T, class S, class Optimizer>
double sharded_step(const Group& group, const ColumnShards& shards, Optimizer& optimizer,
                    ValueTable<T>& shard, const SparseRowGrad<S>& grad) {
  const char* who = "pkm::distributed::sharded_step";
  group.collectively(who, Op::step, [&] {
    detail::check_shard(who, group, shards, shard);
    detail::check_step_args(who, optimizer, shard);
    grad.validate(who, "the gradient", shard.rows());
    if (grad.size() > 0 && grad.dim != shard.dim()) {
      throw std::invalid_argument(std::string(who) + ": the gradient has rows of " +
                                  std::to_string(grad.dim) + ", expected this process's " +
                                  std::to_string(shard.dim()) + " columns");
    }
  });
  detail::Fingerprint rows;
  rows.add(grad.rows.size());
  if (!grad.rows.empty()) rows.add_bytes(grad.rows.data(), grad.rows.size() * sizeof(std::int64_t));
  group.require_same(who,
                     "the gradient's row ids (each process's gradient must cover the same rows)",
                     rows.value());
  detail::require_same_optimizer(who, group, optimizer);
  const optim::ShardReduction reduction = shard_reduction(group, shards.v_dim());
  return optimizer.step(shard, grad, &reduction);
}

}  // namespace pkm::distributed
