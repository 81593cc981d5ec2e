// pkm/memory_layer.hpp — one product-key memory layer: query, product-key search, softmax,
// weighted read of the value table, Memory+ / projection / gate; forward and backward.
//
// The layer is a composition of the ops in linear.hpp, qk_norm.hpp, product_keys.hpp,
// softmax.hpp and embedding_bag.hpp. Its dense parameters live in a LayerParameters (owned
// or viewing the caller's buffers), its value table in a ValueTable (owned, or a view of a
// table several layers share). forward() is const and keeps all per-call state in a
// caller-supplied ForwardCache, so one layer may run forward from several threads at once.
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "pkm/activations.hpp"
#include "pkm/config.hpp"
#include "pkm/detail/parallel.hpp"
#include "pkm/detail/segment_reduce.hpp"
#include "pkm/embedding_bag.hpp"
#include "pkm/init.hpp"
#include "pkm/linear.hpp"
#include "pkm/parameters.hpp"
#include "pkm/product_keys.hpp"
#include "pkm/qk_norm.hpp"
#include "pkm/softmax.hpp"
#include "pkm/sparse_grad.hpp"
#include "pkm/types.hpp"
#include "pkm/value_table.hpp"

namespace pkm {

/// What forward() keeps for backward(). Reuse one per layer and batch shape: its buffers are
/// only reallocated when the batch size changes.
template <class Scalar>
struct ForwardCache {
  MemoryConfig config{};          ///< config of the layer that filled it
  Index batch = -1;               ///< tokens of the last forward; -1 before the first
  RowMatrix<Scalar> query;        ///< B x (H k_dim): q = Wq x + bq
  RowMatrix<Scalar> query_inv_norm;  ///< B x 2H: 1/|q half| (qk_norm only)
  IndexMatrix indices;            ///< B x (H knn): slot ids, per head best first
  RowMatrix<Scalar> scores;       ///< B x (H knn): raw scores, descending per head
  RowMatrix<Scalar> weights;      ///< B x (H knn): softmax of the scores per head
  RowMatrix<Scalar> read;         ///< B x v_dim: y = sum of weighted value rows
  RowMatrix<Scalar> swilu_pre;    ///< B x v_dim: G = W1 x + b1 (memory_plus only)
  RowMatrix<Scalar> hidden;       ///< B x v_dim: y * silu(G) (memory_plus only)
  RowMatrix<Scalar> pre_gate;     ///< B x output_dim: output before the gate (gating only)
  Vector<Scalar> gate;            ///< B: sigmoid(wg . x + bg) (gating only)
  RowMatrix<Scalar> keys_normalized;  ///< (2 H n_keys) x half (qk_norm only)
  Vector<Scalar> key_inv_norm;    ///< 2 H n_keys: 1/|key row| (qk_norm only)
};

/// Gradients of one layer: dense ones in a LayerParameters of the same config, the value
/// table's as a SparseRowGrad. backward() adds to them; zero() clears them.
template <class Scalar>
struct LayerGradients {
  LayerParameters<Scalar> params;
  SparseRowGrad<Scalar> values;

  LayerGradients() = default;
  explicit LayerGradients(const MemoryConfig& config) : params(config) { values.dim = config.v_dim; }
  void zero() {
    params.set_zero();
    values.clear();
  }
};

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
  /// Throws std::invalid_argument for a wrong shape or a non-finite input value, and
  /// std::runtime_error if the parameters produce a non-finite score.
  void forward(const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> out,
               ForwardCache<Scalar>& cache) const {
    const char* who = "pkm::MemoryLayer::forward";
    const MemoryConfig& c = config();
    check_input(who, x, true);
    detail::check_same_shape(who, "out", out.rows(), out.cols(), x.rows(), c.output_dim);
    prepare_cache(cache, x.rows());
    if (x.rows() == 0) return;
    linear_forward<Scalar>(x, params_.query_weight(), bias_or_null(Tensor::query_bias),
                           cache.query);
    search(cache);
    embedding_bag<TableT, Scalar>(values_, cache.indices, cache.weights, cache.read);
    if (c.gating) {
      project(x, cache.pre_gate, cache);
      const auto wg = params_.gate_weight();
      const Scalar bg = params_.gate_bias();
      detail::parallel_for(x.rows(), [&](Index b) {
        const Scalar g = sigmoid<Scalar>(x.row(b).dot(wg.transpose()) + bg);
        cache.gate[b] = g;
        out.row(b) = g * cache.pre_gate.row(b);
      });
    } else {
      project(x, out, cache);
    }
  }

  /// Convenience: returns the output as a new matrix.
  RowMatrix<Scalar> forward(const ConstMatrixRef<Scalar>& x, ForwardCache<Scalar>& cache) const {
    RowMatrix<Scalar> out(x.rows(), config().output_dim);
    forward(x, out, cache);
    return out;
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
  template <class Optimizer>
  double backward_fused(const ConstMatrixRef<Scalar>& x, const ForwardCache<Scalar>& cache,
                        const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                        Optimizer& value_optimizer, MatrixRef<Scalar> dx) {
    return backward_fused_impl(x, cache, dout, dparams, value_optimizer, &dx);
  }
  template <class Optimizer>
  double backward_fused(const ConstMatrixRef<Scalar>& x, const ForwardCache<Scalar>& cache,
                        const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                        Optimizer& value_optimizer) {
    return backward_fused_impl(x, cache, dout, dparams, value_optimizer, nullptr);
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

  const Scalar* bias_or_null(Tensor t) const { return params_.has(t) ? params_.data(t) : nullptr; }
  Scalar* grad_or_null(LayerParameters<Scalar>& g, Tensor t) const {
    return g.has(t) ? g.data(t) : nullptr;
  }

  void check_input(const char* who, const ConstMatrixRef<Scalar>& x, bool check_finite) const {
    if (x.cols() != config().input_dim) {
      throw std::invalid_argument(std::string(who) + ": x has " + std::to_string(x.cols()) +
                                  " columns, expected input_dim = " +
                                  std::to_string(config().input_dim));
    }
    if (!check_finite) return;
    for (Index b = 0; b < x.rows(); ++b) {
      if (x.row(b).allFinite()) continue;
      for (Index d = 0; d < x.cols(); ++d) {
        if (!std::isfinite(x(b, d))) {
          throw std::invalid_argument(std::string(who) + ": x(" + std::to_string(b) + ", " +
                                      std::to_string(d) + ") = " + std::to_string(x(b, d)) +
                                      " is not finite; expected finite inputs");
        }
      }
    }
  }

  void prepare_cache(ForwardCache<Scalar>& cache, Index B) const {
    const MemoryConfig& c = config();
    cache.config = c;
    cache.batch = B;
    const Index bag = c.bag_size();
    cache.query.resize(B, c.heads * c.k_dim);
    cache.indices.resize(B, bag);
    cache.scores.resize(B, bag);
    cache.weights.resize(B, bag);
    cache.read.resize(B, c.v_dim);
    if (c.qk_norm) cache.query_inv_norm.resize(B, 2 * c.heads);
    if (c.memory_plus) {
      cache.swilu_pre.resize(B, c.v_dim);
      cache.hidden.resize(B, c.v_dim);
    }
    if (c.gating) {
      cache.pre_gate.resize(B, c.output_dim);
      cache.gate.resize(B);
    }
  }

  /// The sub-keys used for scoring: the parameters, or their normalised copy in the cache.
  const Scalar* scoring_keys(const ForwardCache<Scalar>& cache) const {
    return config().qk_norm ? cache.keys_normalized.data() : params_.keys().data();
  }

  /// Product-key search and softmax for every token and head.
  void search(ForwardCache<Scalar>& cache) const {
    const MemoryConfig& c = config();
    const Index H = c.heads, n = c.n_keys, k = c.knn, half = c.half(), kd = c.k_dim;
    const Scalar tau = static_cast<Scalar>(c.effective_qk_norm_scale());
    if (c.qk_norm) {
      const Index rows = 2 * H * n;
      cache.keys_normalized.resize(rows, half);
      cache.key_inv_norm.resize(rows);
      const Scalar* keys = params_.keys().data();
      detail::parallel_for(rows, [&](Index r) {
        const Scalar inv = qk_inv_norm(keys + r * half, half);
        cache.key_inv_norm[r] = inv;
        for (Index d = 0; d < half; ++d) cache.keys_normalized(r, d) = keys[r * half + d] * inv;
      });
    }
    const Scalar* keys = scoring_keys(cache);
    struct Scratch {
      RowMatrix<Scalar> qhat, s[2];
      ProductKeyScratch<Scalar> pk;
    };
    detail::parallel_blocks_with<Scratch>(
        cache.batch, detail::kTokenBlock, [&](Scratch& sc, Index b0, Index b1) {
          const Index nb = b1 - b0;
          for (Index h = 0; h < H; ++h) {
            for (Index t = 0; t < 2; ++t) {
              const auto q = cache.query.block(b0, h * kd + t * half, nb, half);
              const ConstMatrixMap<Scalar> K(keys + (2 * h + t) * n * half, n, half);
              if (c.qk_norm) {
                // tau is folded into the normalised query: s = <tau q_hat, k_hat>.
                sc.qhat.resize(nb, half);
                for (Index b = 0; b < nb; ++b) {
                  const Scalar inv = qk_inv_norm(q.row(b).data(), half);
                  cache.query_inv_norm(b0 + b, 2 * h + t) = inv;
                  sc.qhat.row(b) = q.row(b) * (inv * tau);
                }
                sc.s[t].noalias() = sc.qhat * K.transpose();
              } else {
                sc.s[t].noalias() = q * K.transpose();
              }
            }
            for (Index b = 0; b < nb; ++b) {
              if (!sc.s[0].row(b).allFinite() || !sc.s[1].row(b).allFinite()) {
                throw std::runtime_error(
                    "pkm::MemoryLayer::forward: token " + std::to_string(b0 + b) + ", head " +
                    std::to_string(h) +
                    " has a non-finite half score; the layer's keys or query weights hold "
                    "non-finite values");
              }
              const Index col = h * k;
              product_key_topk(sc.s[0].row(b).data(), sc.s[1].row(b).data(), n, k,
                               &cache.indices(b0 + b, col), &cache.scores(b0 + b, col), sc.pk);
              softmax_forward(&cache.scores(b0 + b, col), k, &cache.weights(b0 + b, col));
            }
          }
        });
  }

  /// The output before the gate, from the read y (cache.read): Memory+, projection or y.
  void project(const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> o,
               ForwardCache<Scalar>& cache) const {
    const MemoryConfig& c = config();
    if (c.memory_plus) {
      linear_forward<Scalar>(x, params_.swilu_weight(), bias_or_null(Tensor::swilu_bias),
                             cache.swilu_pre);
      cache.hidden = cache.read.cwiseProduct(
          cache.swilu_pre.unaryExpr([](Scalar g) { return silu<Scalar>(g); }));
      linear_forward<Scalar>(cache.hidden, params_.value_proj_weight(),
                             bias_or_null(Tensor::value_proj_bias), o);
    } else if (c.value_projection) {
      linear_forward<Scalar>(cache.read, params_.value_proj_weight(),
                             bias_or_null(Tensor::value_proj_bias), o);
    } else {
      o = cache.read;
    }
  }

  void check_backward_args(const char* who, const ConstMatrixRef<Scalar>& x,
                           const ForwardCache<Scalar>& cache, const ConstMatrixRef<Scalar>& dout,
                           const LayerParameters<Scalar>& dparams,
                           const SparseRowGrad<Scalar>* dvalues,
                           const MatrixRef<Scalar>* dx) const {
    const MemoryConfig& c = config();
    if (cache.batch < 0 || cache.config != c) {
      throw std::invalid_argument(std::string(who) +
                                  ": cache was not filled by forward() of a layer with this "
                                  "config");
    }
    check_input(who, x, false);
    if (x.rows() != cache.batch) {
      throw std::invalid_argument(std::string(who) + ": x has " + std::to_string(x.rows()) +
                                  " rows, expected the forward batch of " +
                                  std::to_string(cache.batch));
    }
    detail::check_same_shape(who, "dout", dout.rows(), dout.cols(), cache.batch, c.output_dim);
    if (!dout.allFinite()) {
      throw std::invalid_argument(std::string(who) + ": dout holds a non-finite value");
    }
    check_parameters_match(dparams, c, "parameter gradients (dparams)");
    if (dvalues != nullptr && !dvalues->empty() && dvalues->dim != c.v_dim) {
      throw std::invalid_argument(std::string(who) + ": dvalues.dim = " +
                                  std::to_string(dvalues->dim) + ", expected v_dim = " +
                                  std::to_string(c.v_dim));
    }
    if (dx != nullptr) {
      detail::check_same_shape(who, "dx", dx->rows(), dx->cols(), cache.batch, c.input_dim);
    }
    detail::check_indices(who, cache.indices, c.slots());
  }

  void backward_impl(const ConstMatrixRef<Scalar>& x, const ForwardCache<Scalar>& cache,
                     const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                     SparseRowGrad<Scalar>& dvalues, MatrixRef<Scalar>* dx) const {
    check_backward_args("pkm::MemoryLayer::backward", x, cache, dout, dparams, &dvalues, dx);
    if (dvalues.empty()) dvalues.dim = config().v_dim;
    backward_core(x, cache, dout, dparams, dx, [&](const RowMatrix<Scalar>& dy, RowMatrix<Scalar>& dscore) {
      embedding_bag_backward<TableT, Scalar>(values_, cache.indices, cache.weights, dy, dscore, dvalues);
    });
  }

  template <class Optimizer>
  double backward_fused_impl(const ConstMatrixRef<Scalar>& x, const ForwardCache<Scalar>& cache,
                             const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                             Optimizer& opt, MatrixRef<Scalar>* dx) {
    const char* who = "pkm::MemoryLayer::backward_fused";
    check_backward_args(who, x, cache, dout, dparams, nullptr, dx);
    opt.check_table(who, values_);  // before any gradient is written
    double norm = 0.0;
    backward_core(x, cache, dout, dparams, dx, [&](const RowMatrix<Scalar>& dy, RowMatrix<Scalar>& dscore) {
      norm = embedding_bag_backward_update<TableT, Scalar>(values_, cache.indices, cache.weights, dy,
                                                           dscore, opt);
    });
    return norm;
  }

  /// The backward after validation; read_backward(dy, dscore) is the read's backward (it
  /// writes dscore and stores or applies the value gradient).
  template <class ReadBackward>
  void backward_core(const ConstMatrixRef<Scalar>& x, const ForwardCache<Scalar>& cache,
                     const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                     MatrixRef<Scalar>* dx, ReadBackward&& read_backward) const {
    const Index B = cache.batch;
    if (B == 0) return;
    const MemoryConfig& c = config();

    // Gate: d_o = g * dout, dt = <dout, o> g (1 - g).
    RowMatrix<Scalar> d_gated;
    Vector<Scalar> dt;
    if (c.gating) {
      d_gated.resize(B, c.output_dim);
      dt.resize(B);
      detail::parallel_for(B, [&](Index b) {
        const Scalar g = cache.gate[b];
        dt[b] = dout.row(b).dot(cache.pre_gate.row(b)) * g * (Scalar(1) - g);
        d_gated.row(b) = g * dout.row(b);
      });
    }
    const ConstMatrixRef<Scalar> d_o = c.gating ? ConstMatrixRef<Scalar>(d_gated) : dout;

    // Output projection and Memory+: the gradient dy of the read.
    RowMatrix<Scalar> dy(B, c.v_dim), d_swilu;
    if (c.memory_plus) {
      linear_backward_weights<Scalar>(cache.hidden, d_o, dparams.value_proj_weight(),
                                      grad_or_null(dparams, Tensor::value_proj_bias));
      RowMatrix<Scalar> du(B, c.v_dim);
      linear_backward_input<Scalar>(d_o, params_.value_proj_weight(), du, false);
      d_swilu.resize(B, c.v_dim);
      detail::parallel_for(B, [&](Index b) {
        for (Index d = 0; d < c.v_dim; ++d) {
          const Scalar G = cache.swilu_pre(b, d);
          dy(b, d) = du(b, d) * silu<Scalar>(G);
          d_swilu(b, d) = du(b, d) * cache.read(b, d) * silu_grad<Scalar>(G);
        }
      });
      linear_backward_weights<Scalar>(x, d_swilu, dparams.swilu_weight(),
                                      grad_or_null(dparams, Tensor::swilu_bias));
    } else if (c.value_projection) {
      linear_backward_weights<Scalar>(cache.read, d_o, dparams.value_proj_weight(),
                                      grad_or_null(dparams, Tensor::value_proj_bias));
      linear_backward_input<Scalar>(d_o, params_.value_proj_weight(), dy, false);
    } else {
      dy = d_o;
    }

    // Read: weight gradients and the sparse value gradient; then the softmax.
    const Index bag = c.bag_size(), k = c.knn;
    RowMatrix<Scalar> dscore(B, bag);
    read_backward(dy, dscore);
    detail::parallel_for(B, [&](Index b) {
      for (Index h = 0; h < c.heads; ++h) {
        Scalar* z = &dscore(b, h * k);
        softmax_backward(&cache.weights(b, h * k), z, k, z);
      }
    });

    // Product keys and half scores: dq per token, and (row, token, coef) contributions to
    // the sub-key gradient, reduced per row below.
    const Index n = c.n_keys, half = c.half(), kd = c.k_dim, H = c.heads;
    const Scalar tau = static_cast<Scalar>(c.effective_qk_norm_scale());
    const Scalar* keys = scoring_keys(cache);
    RowMatrix<Scalar> dq = RowMatrix<Scalar>::Zero(B, H * kd);
    std::vector<detail::RowContribution<Scalar>> items(static_cast<std::size_t>(B * bag * 2));
    detail::parallel_for(B, [&](Index b) {
      for (Index h = 0; h < H; ++h) {
        std::size_t pos = static_cast<std::size_t>((b * H + h) * 2 * k);
        product_key_backward(&cache.indices(b, h * k), &dscore(b, h * k), k, n,
                             [&](Index t, Index id, Scalar g) {
                               const Index row = (2 * h + t) * n + id;
                               Scalar* dqh = &dq(b, h * kd + t * half);
                               const Scalar* kr = keys + row * half;
                               const Scalar gs = c.qk_norm ? g * tau : g;
                               for (Index d = 0; d < half; ++d) dqh[d] += gs * kr[d];
                               const Scalar coef =
                                   c.qk_norm ? gs * cache.query_inv_norm(b, 2 * h + t) : g;
                               items[pos++] = {row, b, coef};
                             });
        if (c.qk_norm) {
          for (Index t = 0; t < 2; ++t) {
            Scalar* dqh = &dq(b, h * kd + t * half);
            qk_norm_backward(&cache.query(b, h * kd + t * half),
                             cache.query_inv_norm(b, 2 * h + t), dqh, half, dqh);
          }
        }
      }
    });
    std::vector<std::int64_t> key_rows;
    RowMatrix<Scalar> key_grads;
    detail::segment_reduce(
        items, half,
        [&](std::int64_t b, std::int64_t row) { return &cache.query(b, (row / n) * half); },
        key_rows, key_grads);
    auto dkeys = dparams.keys();
    const auto pkeys = params_.keys();
    detail::parallel_for(static_cast<Index>(key_rows.size()), [&](Index u) {
      const Index r = key_rows[u];
      Scalar* g = key_grads.row(u).data();
      if (c.qk_norm) qk_norm_backward(pkeys.row(r).data(), cache.key_inv_norm[r], g, half, g);
      dkeys.row(r) += key_grads.row(u);
    });

    // Query projection, then the input gradient: dq Wq (+ dG W1) (+ dt wg).
    linear_backward_weights<Scalar>(x, dq, dparams.query_weight(),
                                    grad_or_null(dparams, Tensor::query_bias));
    if (c.gating) {
      const ConstMatrixMap<Scalar> dt_col(dt.data(), B, 1);
      linear_backward_weights<Scalar>(x, dt_col, dparams.matrix(Tensor::gate_weight),
                                      dparams.data(Tensor::gate_bias));
    }
    if (dx != nullptr) {
      linear_backward_input<Scalar>(dq, params_.query_weight(), *dx, false);
      if (c.memory_plus) linear_backward_input<Scalar>(d_swilu, params_.swilu_weight(), *dx, true);
      if (c.gating) {
        const ConstMatrixMap<Scalar> dt_col(dt.data(), B, 1);
        linear_backward_input<Scalar>(dt_col, params_.matrix(Tensor::gate_weight), *dx, true);
      }
    }
  }

  LayerParameters<Scalar> params_;
  ValueTable<TableT> values_;
};

}  // namespace pkm
