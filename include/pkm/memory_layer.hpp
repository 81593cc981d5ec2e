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
// (one cache per thread). Its entry points (forward, backward, backward_to with a value-gradient
// sink, backward_fused) are pkm::LayerApi's (pkm/layer_api.hpp); the composition around the read
// is pkm/layer_composition.hpp.
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "pkm/config.hpp"
#include "pkm/detail/checks.hpp"
#include "pkm/detail/parallel.hpp"
#include "pkm/detail/vec_math.hpp"
#include "pkm/embedding_bag.hpp"
#include "pkm/init.hpp"
#include "pkm/layer_api.hpp"
#include "pkm/layer_cache.hpp"
#include "pkm/layer_composition.hpp"
#include "pkm/parameters.hpp"
#include "pkm/quantized_bag.hpp"
#include "pkm/quantized_table.hpp"
#include "pkm/row_fetch.hpp"
#include "pkm/sparse_grad.hpp"
#include "pkm/types.hpp"
#include "pkm/value_gradient.hpp"
#include "pkm/value_table.hpp"

namespace pkm {

namespace detail {
template <class TableT>
struct layer_table {
  using type = ValueTable<TableT>;
};
template <>
struct layer_table<Quantized> {
  using type = QuantizedTable;
};
}  // namespace detail

/// The table a layer with table type TableT reads: ValueTable<TableT>, or QuantizedTable for
/// pkm::Quantized.
template <class TableT>
using layer_table_t = typename detail::layer_table<TableT>::type;

namespace detail {
/// The refusal of a backward through a quantized table.
[[noreturn]] inline void refuse_quantized_backward(const char* who, Dtype format) {
  throw std::invalid_argument(
      std::string(who) + ": the value table is " + dtype_name(format) +
      "; quantized tables serve inference only (train with an f32 or bf16 table, then "
      "pkm::quantize it); nothing was changed");
}
}  // namespace detail

/// A product-key memory layer with dense parameters of type Scalar (float for use, double for
/// gradient checks) reading a value table stored as TableT (float, bf16, fp16, double, or
/// pkm::Quantized for a QuantizedTable: inference only, Scalar float). Its forward and backward
/// entry points are pkm::LayerApi's (pkm/layer_api.hpp), the same as the memory-parallel
/// layer's; a layer reading a quantized table refuses backward and backward_fused.
template <class Scalar, class TableT = Scalar>
class MemoryLayer : public LayerApi<MemoryLayer<Scalar, TableT>, Scalar, ForwardCache<Scalar>> {
  static_assert(std::is_floating_point_v<Scalar>,
                "pkm::MemoryLayer: Scalar must be float or double");
  static constexpr bool kQuantized = std::is_same_v<TableT, Quantized>;
  static_assert(!kQuantized || std::is_same_v<Scalar, float>,
                "pkm::MemoryLayer: a layer reading a quantized table computes in float");
  friend class LayerApi<MemoryLayer<Scalar, TableT>, Scalar, ForwardCache<Scalar>>;

 public:
  using scalar_type = Scalar;
  using table_type = TableT;
  using table_storage = layer_table_t<TableT>;

  /// Owns all its parameters and its value table, initialised from `seed`.
  MemoryLayer(const MemoryConfig& config, std::uint64_t seed)
      : params_(config), values_(config.slots(), config.v_dim) {
    static_assert(!kQuantized,
                  "pkm::MemoryLayer: a quantized layer is made from a trained table "
                  "(pkm::quantize), not from a seed");
    init_parameters(params_, seed);
    init_values(values_, seed);
  }

  /// Owns its dense parameters (initialised from `seed`) and reads `values`, typically a view
  /// of a table shared with other layers (`pool.view()`); pass an owning table with std::move.
  MemoryLayer(const MemoryConfig& config, table_storage&& values, std::uint64_t seed)
      : params_(config), values_(std::move(values)) {
    check_table();
    init_parameters(params_, seed);
  }

  /// Uses the given parameters and table as they are (each owned or a view).
  MemoryLayer(LayerParameters<Scalar> params, table_storage&& values)
      : params_(std::move(params)), values_(std::move(values)) {
    params_.config().validate();
    check_table();
  }

  const MemoryConfig& config() const { return params_.config(); }
  LayerParameters<Scalar>& params() { return params_; }
  const LayerParameters<Scalar>& params() const { return params_; }
  table_storage& values() { return values_; }
  const table_storage& values() const { return values_; }
  /// The table's rows and the width of its rows (LayerApi's value gradients are of this shape).
  Index value_rows() const { return values_.rows(); }
  Index value_width() const { return values_.dim(); }

  /// The hook each forward calls with the rows it is about to read (pkm/row_fetch.hpp); an
  /// empty one (the default) is not called. pkm::io::load_layer_mapped sets one that checks
  /// the file and, if asked, fetches the rows early. Copies of the layer share the hook's
  /// state through whatever the hook holds.
  void set_row_fetch(RowFetch fetch) { fetch_ = std::move(fetch); }
  const RowFetch& row_fetch() const { return fetch_; }

 private:
  void check_table() const {
    const MemoryConfig& c = config();
    if (values_.rows() != c.slots() || values_.dim() != c.v_dim) {
      throw std::invalid_argument("pkm::MemoryLayer: value table is " +
                                  std::to_string(values_.rows()) + " x " +
                                  std::to_string(values_.dim()) + ", expected n_keys^2 x v_dim = " +
                                  std::to_string(c.slots()) + " x " + std::to_string(c.v_dim));
    }
  }

  // LayerApi's implementations (defined below, outside the class: see there).
  void forward_core(const ConstMatrixRef<Scalar>& x, MatrixRef<Scalar> out,
                    ForwardCache<Scalar>& cache) const;
  template <class Sink>
  void backward_core(const ConstMatrixRef<Scalar>& x, const ForwardCache<Scalar>& cache,
                     const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                     Sink& sink, MatrixRef<Scalar>* dx) const;
  template <class Optimizer>
  double backward_fused_core(const ConstMatrixRef<Scalar>& x, const ForwardCache<Scalar>& cache,
                             const ConstMatrixRef<Scalar>& dout, LayerParameters<Scalar>& dparams,
                             Optimizer& opt, MatrixRef<Scalar>* dx);

  LayerParameters<Scalar> params_;
  table_storage values_;
  RowFetch fetch_;
};

// The entry points that do the work are defined outside the class, so that they are not
// implicitly inline: an `extern template` declaration (pkm/precompiled.hpp) then keeps them
// — and the ops they call — from being compiled again in every translation unit.

template <class Scalar, class TableT>
void MemoryLayer<Scalar, TableT>::forward_core(const ConstMatrixRef<Scalar>& x,
                                               MatrixRef<Scalar> out,
                                               ForwardCache<Scalar>& cache) const {
  const char* who = "pkm::MemoryLayer::forward";
  composition::forward_begin(who, params_, x, out, cache);
  if (x.rows() > 0) {
    if (fetch_) fetch_(cache.indices.data(), static_cast<Index>(cache.indices.size()));
    if constexpr (kQuantized) {
      embedding_bag(values_, cache.indices, cache.weights, cache.read);
      detail::check_bag_read(who, values_, cache.indices, cache.read);
    } else {
      embedding_bag<TableT, Scalar>(values_, cache.indices, cache.weights, cache.read);
      detail::check_bag_read<TableT, Scalar>(who, values_, cache.indices, cache.read);
    }
  }
  composition::forward_end(who, params_, x, out, cache);
}

template <class Scalar, class TableT>
template <class Sink>
void MemoryLayer<Scalar, TableT>::backward_core(const ConstMatrixRef<Scalar>& x,
                                                const ForwardCache<Scalar>& cache,
                                                const ConstMatrixRef<Scalar>& dout,
                                                LayerParameters<Scalar>& dparams, Sink& sink,
                                                MatrixRef<Scalar>* dx) const {
  const char* who = "pkm::MemoryLayer::backward";
  if constexpr (kQuantized) {
    (void)x, (void)cache, (void)dout, (void)dparams, (void)sink, (void)dx;
    detail::refuse_quantized_backward(who, values_.format());
  } else {
    composition::check_backward(who, params_, x, cache, dout, dparams, dx);
    check_sink(sink, who, values_.rows(), values_.dim());
    if (cache.batch == 0) return;
    // The read's gradient first, without touching dparams; the sink takes the value gradient.
    LayerWorkspace<Scalar>& ws = composition::backward_begin(params_, cache, dout);
    embedding_bag_backward_to<TableT, Scalar>(values_, cache.indices, cache.weights, ws.dy,
                                              ws.dscore, sink, ws.bag);
    composition::backward_end(params_, x, cache, dout, dparams, dx);
  }
}

template <class Scalar, class TableT>
template <class Optimizer>
double MemoryLayer<Scalar, TableT>::backward_fused_core(const ConstMatrixRef<Scalar>& x,
                                                        const ForwardCache<Scalar>& cache,
                                                        const ConstMatrixRef<Scalar>& dout,
                                                        LayerParameters<Scalar>& dparams,
                                                        Optimizer& opt, MatrixRef<Scalar>* dx) {
  const char* who = "pkm::MemoryLayer::backward_fused";
  if constexpr (kQuantized) {
    (void)x, (void)cache, (void)dout, (void)dparams, (void)opt, (void)dx;
    detail::refuse_quantized_backward(who, values_.format());
  } else {
  composition::check_backward(who, params_, x, cache, dout, dparams, dx);
  opt.check_table(who, values_);  // before any gradient is written
  if (cache.batch == 0) return 0.0;
  // The read's gradient first, without touching dparams: the update may still refuse it, and
  // then nothing at all has changed.
  LayerWorkspace<Scalar>& ws = composition::backward_begin(params_, cache, dout);
  if (!detail::all_finite(ws.dy.data(), ws.dy.size())) {
    throw std::runtime_error(
        std::string(who) +
        ": the gradient of the read (dout through the output op) is not finite "
        "although dout is: dout or the output op's parameters are too large; "
        "nothing was updated");
  }
  const double norm = embedding_bag_backward_update<TableT, Scalar>(
      values_, cache.indices, cache.weights, ws.dy, ws.dscore, opt, ws.bag);
  composition::backward_end(params_, x, cache, dout, dparams, dx);
  return norm;
  }
}

}  // namespace pkm
