// pkm/parameters.hpp — the dense parameters of one memory layer (everything but the value
// table), by the names of the reference PyTorch module, either owned or viewing caller memory.
// The same type holds their gradients.
#pragma once

#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "pkm/config.hpp"
#include "pkm/detail/aligned_buffer.hpp"
#include "pkm/detail/vec_math.hpp"
#include "pkm/types.hpp"

namespace pkm {

/// The dense tensors of a layer. Names and shapes are those of the reference `HashingMemory`.
enum class Tensor : int {
  keys = 0,           ///< (2 H n_keys, k_dim/2) sub-keys, row (h*2 + half)*n_keys + i
  query_weight,       ///< (H k_dim, input_dim)  Wq
  query_bias,         ///< (H k_dim)             bq            [query_bias]
  swilu_weight,       ///< (v_dim, input_dim)    W1            [memory_plus]
  swilu_bias,         ///< (v_dim)               b1            [memory_plus]
  value_proj_weight,  ///< (output_dim, v_dim)   W2            [value_projection]
  value_proj_bias,    ///< (output_dim)          b2            [value_projection]
  gate_weight,        ///< (1, input_dim)        wg            [gating]
  gate_bias,          ///< (1)                   bg            [gating]
};
inline constexpr int kNumTensors = 9;

/// Shape of a tensor: rank 1 (cols == 1) or rank 2, and whether the config has it.
struct TensorShape {
  Index rows = 0;
  Index cols = 0;
  int rank = 2;
  bool present = false;
  Index size() const { return present ? rows * cols : 0; }
};

/// The state_dict name of a tensor in the reference PyTorch code.
inline const char* tensor_name(Tensor t) {
  static constexpr const char* kNames[kNumTensors] = {"keys",
                                                      "query_proj.query_mlps.0.weight",
                                                      "query_proj.query_mlps.0.bias",
                                                      "swilu_projection.weight",
                                                      "swilu_projection.bias",
                                                      "value_proj.weight",
                                                      "value_proj.bias",
                                                      "gating.weight",
                                                      "gating.bias"};
  return kNames[static_cast<int>(t)];
}

inline TensorShape tensor_shape(const MemoryConfig& c, Tensor t) {
  const Index hk = c.heads * c.k_dim;
  switch (t) {
    case Tensor::keys:
      return {2 * c.heads * c.n_keys, c.half(), 2, true};
    case Tensor::query_weight:
      return {hk, c.input_dim, 2, true};
    case Tensor::query_bias:
      return {hk, 1, 1, c.query_bias};
    case Tensor::swilu_weight:
      return {c.v_dim, c.input_dim, 2, c.memory_plus};
    case Tensor::swilu_bias:
      return {c.v_dim, 1, 1, c.memory_plus};
    case Tensor::value_proj_weight:
      return {c.output_dim, c.v_dim, 2, c.value_projection};
    case Tensor::value_proj_bias:
      return {c.output_dim, 1, 1, c.value_projection};
    case Tensor::gate_weight:
      return {1, c.input_dim, 2, c.gating};
    case Tensor::gate_bias:
      return {1, 1, 1, c.gating};
  }
  throw std::invalid_argument("pkm: unknown tensor id " + std::to_string(static_cast<int>(t)));
}

/// Caller-owned buffers for LayerParameters::view: one row-major pointer per present tensor
/// (absent ones stay nullptr). Each must hold tensor_shape(config, t).size() elements.
template <class Scalar>
struct ParameterBuffers {
  Scalar* keys = nullptr;
  Scalar* query_weight = nullptr;
  Scalar* query_bias = nullptr;
  Scalar* swilu_weight = nullptr;
  Scalar* swilu_bias = nullptr;
  Scalar* value_proj_weight = nullptr;
  Scalar* value_proj_bias = nullptr;
  Scalar* gate_weight = nullptr;
  Scalar* gate_bias = nullptr;
};

namespace detail {
struct PackedLayerWeights;  // pkm/packed_weights.hpp

/// When a LayerParameters' values were last changed and last found finite: a counter bumped by
/// every non-const access, and the counter's value at the last check that found every value
/// finite. Shared by the parameters and the optimizers they are registered with (which write
/// through their own pointers), so it survives moves of the parameters. Relaxed atomics:
/// concurrent const readers (the layer's forward from several threads) may each run the check
/// and record it.
class ModificationStamp {
 public:
  static constexpr std::uint64_t kNever = ~std::uint64_t{0};
  ModificationStamp() = default;
  ModificationStamp(const ModificationStamp&) = delete;
  ModificationStamp& operator=(const ModificationStamp&) = delete;
  /// Marks the values changed (a plain load and store: bumps racing each other may merge, and
  /// any bump still differs from every value recorded before it).
  void touch() {
    version_.store(version_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  }
  std::uint64_t version() const { return version_.load(std::memory_order_relaxed); }
  bool checked() const { return checked_.load(std::memory_order_relaxed) == version(); }
  void record_checked(std::uint64_t version) const {
    checked_.store(version, std::memory_order_relaxed);
  }
  /// The layer's weights packed for bf16 products (pkm/packed_weights.hpp) if they were made
  /// at `version`, else null. Kept here so that every view sharing the stamp (the PyTorch
  /// operator's calls) shares them and any change of the values makes them stale.
  std::shared_ptr<const PackedLayerWeights> packed(std::uint64_t version) const {
    const std::lock_guard<std::mutex> lock(mutex_);
    return packed_version_ == version ? packed_ : nullptr;
  }
  void set_packed(std::shared_ptr<const PackedLayerWeights> p, std::uint64_t version) const {
    const std::lock_guard<std::mutex> lock(mutex_);
    packed_ = std::move(p);
    packed_version_ = version;
  }

 private:
  std::atomic<std::uint64_t> version_{0};
  mutable std::atomic<std::uint64_t> checked_{kNever};
  mutable std::mutex mutex_;
  mutable std::shared_ptr<const PackedLayerWeights> packed_;
  mutable std::uint64_t packed_version_ = kNever;
};
}  // namespace detail

/// The dense parameters (or gradients) of one layer. Either owns one zero-initialised buffer
/// holding every present tensor, or views buffers the caller owns (no copy is made).
/// Copying an owning set copies the values; copying a view copies the view.
///
/// The layer's forward checks that every parameter is finite once per change, not on every
/// call: every non-const access (matrix(), vector(), data(), the named accessors, for_each,
/// set_zero — the optimizers' steps included) marks the values changed. Code that writes
/// through a pointer or map it kept from before, or into the caller's own buffers of a view,
/// calls mark_modified() afterwards (the forward still refuses a non-finite output or score
/// such a value causes, with a less precise message).
template <class Scalar>
class LayerParameters {
 public:
  LayerParameters() = default;

  /// Owning, all zeros. Validates the config.
  explicit LayerParameters(const MemoryConfig& config) : config_(config) {
    config_.validate();
    check_compute<Scalar>(config_);
    std::size_t total = 0;
    std::array<std::size_t, kNumTensors> offsets{};
    for (int t = 0; t < kNumTensors; ++t) {
      offsets[t] = total;
      const auto n = static_cast<std::size_t>(tensor_shape(config_, Tensor(t)).size());
      total += (n + 15) / 16 * 16;  // 64-byte aligned starts for float
    }
    storage_ = detail::AlignedBuffer<Scalar>(total);
    for (int t = 0; t < kNumTensors; ++t) {
      ptr_[t] = tensor_shape(config_, Tensor(t)).present ? storage_.data() + offsets[t] : nullptr;
    }
  }

  /// Views caller-owned buffers. Throws std::invalid_argument if a present tensor's pointer
  /// is null or an absent tensor's pointer is not.
  /// As above, sharing `stamp` (detail::ModificationStamp): a caller that knows the buffers did
  /// not change since a previous view passed the finiteness check (the PyTorch operator tracks
  /// its tensors' versions) hands the same stamp again, and the check is not repeated.
  static LayerParameters view(const MemoryConfig& config, const ParameterBuffers<Scalar>& b,
                              std::shared_ptr<detail::ModificationStamp> stamp) {
    LayerParameters p = view(config, b);
    if (stamp) p.stamp_ = std::move(stamp);
    return p;
  }
  static LayerParameters view(const MemoryConfig& config, const ParameterBuffers<Scalar>& b) {
    config.validate();
    check_compute<Scalar>(config);
    LayerParameters p;
    p.config_ = config;
    const std::array<Scalar*, kNumTensors> ptrs = {
        b.keys,       b.query_weight,      b.query_bias,      b.swilu_weight,
        b.swilu_bias, b.value_proj_weight, b.value_proj_bias, b.gate_weight,
        b.gate_bias};
    for (int t = 0; t < kNumTensors; ++t) {
      const bool present = tensor_shape(config, Tensor(t)).present;
      if (present && ptrs[t] == nullptr) {
        throw std::invalid_argument(std::string("pkm::LayerParameters::view: buffer for '") +
                                    tensor_name(Tensor(t)) +
                                    "' is null; the config needs this tensor");
      }
      if (!present && ptrs[t] != nullptr) {
        throw std::invalid_argument(std::string("pkm::LayerParameters::view: buffer for '") +
                                    tensor_name(Tensor(t)) +
                                    "' is given but the config has no such tensor");
      }
      p.ptr_[t] = ptrs[t];
    }
    return p;
  }

  /// A copy has a stamp of its own, unchecked.
  LayerParameters(const LayerParameters& o) : config_(o.config_), storage_(o.storage_) {
    rebase(o);
  }
  LayerParameters& operator=(const LayerParameters& o) {
    if (this != &o) {
      config_ = o.config_;
      storage_ = o.storage_;
      rebase(o);
      stamp_ = std::make_shared<detail::ModificationStamp>();
    }
    return *this;
  }
  /// A move takes the buffers (their addresses stay valid) and the stamp along.
  LayerParameters(LayerParameters&&) noexcept = default;
  LayerParameters& operator=(LayerParameters&&) noexcept = default;

  /// Marks the values changed: the next forward checks them again (see the class comment).
  void mark_modified() { touch(); }
  /// How many times the values were marked changed (non-const accesses, optimizer steps).
  std::uint64_t modification_count() const { return stamp_ ? stamp_->version() : 0; }
  /// True when the last change was followed by a check that found every value finite.
  bool checked_finite() const { return stamp_ && stamp_->checked(); }
  /// The stamp itself, shared with whoever writes the values through pointers of its own (the
  /// optimizers mark each step on it); null only in a moved-from object.
  const std::shared_ptr<detail::ModificationStamp>& stamp() const { return stamp_; }

  const MemoryConfig& config() const { return config_; }
  /// Sets the precision of the layer's products (MemoryConfig::compute: Dtype::f32 or
  /// Dtype::bf16) without touching any value: a checkpoint loaded in fp32 serves or trains
  /// with bf16 products from here on. Throws std::invalid_argument (and changes nothing)
  /// for another dtype or bf16 on a double layer.
  void set_compute(Dtype compute) { set_config_dtype(&MemoryConfig::compute, compute); }
  /// Sets the precision of the key search's half scores (MemoryConfig::score_compute) likewise.
  void set_score_compute(Dtype score_compute) {
    set_config_dtype(&MemoryConfig::score_compute, score_compute);
  }
  bool owns_storage() const { return storage_.size() > 0; }
  bool has(Tensor t) const { return ptr_[static_cast<int>(t)] != nullptr; }
  TensorShape shape(Tensor t) const { return tensor_shape(config_, t); }

  /// Row-major view of a tensor (a rank-1 tensor is a column). Throws if the config lacks it.
  MatrixMap<Scalar> matrix(Tensor t) {
    const TensorShape s = checked(t);
    touch();
    return MatrixMap<Scalar>(ptr_[static_cast<int>(t)], s.rows, s.cols);
  }
  ConstMatrixMap<Scalar> matrix(Tensor t) const {
    const TensorShape s = checked(t);
    return ConstMatrixMap<Scalar>(ptr_[static_cast<int>(t)], s.rows, s.cols);
  }
  VectorMap<Scalar> vector(Tensor t) {
    const TensorShape s = checked(t);
    touch();
    return VectorMap<Scalar>(ptr_[static_cast<int>(t)], s.rows * s.cols);
  }
  ConstVectorMap<Scalar> vector(Tensor t) const {
    const TensorShape s = checked(t);
    return ConstVectorMap<Scalar>(ptr_[static_cast<int>(t)], s.rows * s.cols);
  }
  Scalar* data(Tensor t) {
    touch();
    return ptr_[static_cast<int>(t)];
  }
  const Scalar* data(Tensor t) const { return ptr_[static_cast<int>(t)]; }

  // Named accessors, for readable model code.
  MatrixMap<Scalar> keys() { return matrix(Tensor::keys); }
  ConstMatrixMap<Scalar> keys() const { return matrix(Tensor::keys); }
  MatrixMap<Scalar> query_weight() { return matrix(Tensor::query_weight); }
  ConstMatrixMap<Scalar> query_weight() const { return matrix(Tensor::query_weight); }
  VectorMap<Scalar> query_bias() { return vector(Tensor::query_bias); }
  ConstVectorMap<Scalar> query_bias() const { return vector(Tensor::query_bias); }
  MatrixMap<Scalar> swilu_weight() { return matrix(Tensor::swilu_weight); }
  ConstMatrixMap<Scalar> swilu_weight() const { return matrix(Tensor::swilu_weight); }
  VectorMap<Scalar> swilu_bias() { return vector(Tensor::swilu_bias); }
  ConstVectorMap<Scalar> swilu_bias() const { return vector(Tensor::swilu_bias); }
  MatrixMap<Scalar> value_proj_weight() { return matrix(Tensor::value_proj_weight); }
  ConstMatrixMap<Scalar> value_proj_weight() const { return matrix(Tensor::value_proj_weight); }
  VectorMap<Scalar> value_proj_bias() { return vector(Tensor::value_proj_bias); }
  ConstVectorMap<Scalar> value_proj_bias() const { return vector(Tensor::value_proj_bias); }
  VectorMap<Scalar> gate_weight() { return vector(Tensor::gate_weight); }
  ConstVectorMap<Scalar> gate_weight() const { return vector(Tensor::gate_weight); }
  Scalar& gate_bias() {
    touch();
    return *checked_ptr(Tensor::gate_bias);
  }
  Scalar gate_bias() const { return *checked_ptr(Tensor::gate_bias); }

  /// Calls fn(Tensor, MatrixMap) for each present tensor, in enum order.
  template <class F>
  void for_each(F&& fn) {
    for (int t = 0; t < kNumTensors; ++t)
      if (ptr_[t]) fn(Tensor(t), matrix(Tensor(t)));
  }
  template <class F>
  void for_each(F&& fn) const {
    for (int t = 0; t < kNumTensors; ++t)
      if (ptr_[t]) fn(Tensor(t), matrix(Tensor(t)));
  }

  /// Sets every present tensor to zero (for gradients).
  void set_zero() {
    for_each([](Tensor, MatrixMap<Scalar> m) { m.setZero(); });
  }

 private:
  // Sets one dtype field of the config, validated as a whole: nothing changes on error.
  void set_config_dtype(Dtype MemoryConfig::*field, Dtype value) {
    MemoryConfig c = config_;
    c.*field = value;
    c.validate();
    check_compute<Scalar>(c);
    config_ = c;
  }
  TensorShape checked(Tensor t) const {
    const TensorShape s = tensor_shape(config_, t);
    if (ptr_[static_cast<int>(t)] == nullptr) {
      throw std::invalid_argument(std::string("pkm::LayerParameters: tensor '") + tensor_name(t) +
                                  "' is not part of this layer's config");
    }
    return s;
  }
  Scalar* checked_ptr(Tensor t) const {
    checked(t);
    return ptr_[static_cast<int>(t)];
  }
  void touch() {
    if (stamp_) stamp_->touch();
  }
  void rebase(const LayerParameters& o) {
    for (int t = 0; t < kNumTensors; ++t) {
      ptr_[t] = (o.ptr_[t] && o.owns_storage()) ? storage_.data() + (o.ptr_[t] - o.storage_.data())
                                                : o.ptr_[t];
    }
  }

  MemoryConfig config_{};
  detail::AlignedBuffer<Scalar> storage_;
  std::array<Scalar*, kNumTensors> ptr_{};
  std::shared_ptr<detail::ModificationStamp> stamp_ = std::make_shared<detail::ModificationStamp>();
};

/// Throws std::invalid_argument unless `p` was made for `config` (same sizes and switches).
template <class Scalar>
void check_parameters_match(const LayerParameters<Scalar>& p, const MemoryConfig& config,
                            const char* what) {
  if (p.config() != config) {
    throw std::invalid_argument(std::string("pkm: ") + what +
                                " were made for a different MemoryConfig than this layer's");
  }
}

/// Throws std::runtime_error naming the first tensor and element of `p` that holds NaN or an
/// infinity (the layer's forward checks its parameters with this before computing anything).
/// Scans the values only where they changed since the last scan that found them finite
/// (LayerParameters' modification stamp); `always` scans regardless.
template <class Scalar>
void check_parameters_finite(const char* who, const LayerParameters<Scalar>& p,
                             bool always = false) {
  const auto& stamp = p.stamp();
  if (!always && stamp && stamp->checked()) return;
  const std::uint64_t version = stamp ? stamp->version() : 0;
  p.for_each([&](Tensor t, ConstMatrixMap<Scalar> m) {
    if (detail::all_finite(m.data(), m.size())) return;
    const Scalar* d = m.data();
    for (Index i = 0; i < m.size(); ++i) {
      if (!std::isfinite(d[i])) {
        throw std::runtime_error(std::string(who) + ": parameter '" + tensor_name(t) + "' holds " +
                                 std::to_string(d[i]) + " at element " + std::to_string(i) +
                                 "; expected finite parameters");
      }
    }
  });
  if (stamp) stamp->record_checked(version);
}

}  // namespace pkm
