// pkm/config.hpp — the sizes and switches of one product-key memory layer, and their validation.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "pkm/detail/checked.hpp"
#include "pkm/dtype.hpp"

namespace pkm {

/// How a head's k selected scores become the weights of the rows it reads: the softmax of
/// "Memory Layers at Scale" and the reference code, or ReLU(score) (no normalisation; the
/// activation Csordas et al. 2023, "Approximating Two-Layer Feedforward Networks for Efficient
/// Transformers", found to work better for product-key memories).
enum class ScoreActivation : std::uint8_t { softmax = 0, relu = 1 };

inline const char* score_activation_name(ScoreActivation a) {
  return a == ScoreActivation::relu ? "relu" : "softmax";
}

/// "softmax" or "relu"; std::nullopt for anything else.
inline std::optional<ScoreActivation> parse_score_activation(const std::string& s) {
  if (s == "softmax") return ScoreActivation::softmax;
  if (s == "relu") return ScoreActivation::relu;
  return std::nullopt;
}

/// Everything that decides the shapes and the computation of one memory layer.
///
/// Sizes follow "Memory Layers at Scale" (arXiv 2412.09764): `heads` query heads, each
/// scoring two halves of a `k_dim` query against `n_keys` sub-keys per half, so that the
/// value table has `n_keys * n_keys` rows of `v_dim` values; each head keeps `knn` slots.
struct MemoryConfig {
  std::int64_t input_dim = 0;   ///< width of the layer's input x
  std::int64_t heads = 1;       ///< query heads H; all heads read the same value table
  std::int64_t n_keys = 0;      ///< sub-keys per half; the table has n_keys^2 rows
  std::int64_t k_dim = 0;       ///< query width per head (even; each half is k_dim / 2)
  std::int64_t knn = 32;        ///< slots kept per head, 1 <= knn <= n_keys
  std::int64_t v_dim = 0;       ///< width of a value row
  std::int64_t output_dim = 0;  ///< width of the output; must equal v_dim without projection

  bool memory_plus = true;       ///< out = W2 (y * silu(W1 x + b1)) + b2 ("Memory+", swilu)
  bool value_projection = true;  ///< W2, b2 present; without it out = y
  bool gating = false;           ///< out <- sigmoid(wg . x + bg) * out
  bool query_bias = true;        ///< bq present
  bool qk_norm = false;          ///< normalise query halves and sub-keys before scoring
  /// Scale tau of the normalised scores; unset means sqrt(k_dim / 2).
  std::optional<double> qk_norm_scale;
  /// Precision of the layer's matrix products (query, Memory+ and output projections, forward
  /// and backward): Dtype::f32, or Dtype::bf16 — operands rounded to bf16, fp32 sums, fp32
  /// parameters and activations (pkm/gemm_bf16.hpp; float layers only). The key search, the
  /// read and the softmax stay fp32.
  Dtype compute = Dtype::f32;
  /// Precision of the key search's half-score products (query halves x sub-keys): Dtype::f32
  /// (default: each score is the fp32 dot product of its query half and sub-key), or
  /// Dtype::bf16 — both rounded to bf16 with fp32 sums, as torch.autocast computes them (float
  /// layers only; on CPUs without bf16 products, fp32). The top-k stays exact over the scores
  /// computed.
  Dtype score_compute = Dtype::f32;
  /// The selected scores' weights: softmax per head (default), or ReLU.
  ScoreActivation score_activation = ScoreActivation::softmax;

  /// Half of k_dim: the width of one sub-key.
  std::int64_t half() const { return k_dim / 2; }
  /// Number of memory slots, n_keys^2: the rows of the value table. Throws
  /// std::invalid_argument where n_keys^2 would overflow (an unvalidated config).
  std::int64_t slots() const {
    return detail::checked_mul("pkm::MemoryConfig::slots", "n_keys^2", n_keys, n_keys);
  }
  /// H * knn: the rows each token reads (checked like slots()).
  std::int64_t bag_size() const {
    return detail::checked_mul("pkm::MemoryConfig::bag_size", "heads x knn", heads, knn);
  }
  /// The scale applied to normalised scores (qk_norm only).
  double effective_qk_norm_scale() const {
    return qk_norm_scale ? *qk_norm_scale : std::sqrt(static_cast<double>(half()));
  }

  /// Every field, in declaration order: the one list that equality and the memory-parallel
  /// group's fingerprint (pkm/distributed) are made from. A new field goes here too.
  auto fields() const {
    return std::tie(input_dim, heads, n_keys, k_dim, knn, v_dim, output_dim, memory_plus,
                    value_projection, gating, query_bias, qk_norm, qk_norm_scale, compute,
                    score_activation, score_compute);
  }

  /// Throws std::invalid_argument naming the first field out of range.
  void validate() const;
};

/// Largest accepted width of any dimension (keeps every product of sizes far from overflow).
inline constexpr std::int64_t kMaxDim = std::int64_t{1} << 24;
/// Largest accepted n_keys: n_keys^2 slots then still index comfortably in 64 bits.
inline constexpr std::int64_t kMaxKeys = std::int64_t{1} << 16;

namespace detail {
/// The config's precision fields, by name: the ones validate() and check_compute() check.
inline std::array<std::pair<const char*, Dtype>, 2> product_dtypes(const MemoryConfig& c) {
  return {{{"compute", c.compute}, {"score_compute", c.score_compute}}};
}

inline void check_range(const char* field, std::int64_t value, std::int64_t lo, std::int64_t hi,
                        const char* extra = "") {
  if (value < lo || value > hi) {
    throw std::invalid_argument("pkm::MemoryConfig: " + std::string(field) + " = " +
                                std::to_string(value) + " is out of range; expected " +
                                std::to_string(lo) + " <= " + field + " <= " + std::to_string(hi) +
                                extra);
  }
}
}  // namespace detail

inline void MemoryConfig::validate() const {
  detail::check_range("input_dim", input_dim, 1, kMaxDim);
  detail::check_range("heads", heads, 1, 4096);
  detail::check_range("n_keys", n_keys, 1, kMaxKeys);
  detail::check_range("k_dim", k_dim, 2, kMaxDim);
  if (k_dim % 2 != 0) {
    throw std::invalid_argument("pkm::MemoryConfig: k_dim = " + std::to_string(k_dim) +
                                " must be even (each query is split into two halves)");
  }
  detail::check_range("knn", knn, 1, n_keys, " (n_keys)");
  detail::check_range("v_dim", v_dim, 1, kMaxDim);
  detail::check_range("output_dim", output_dim, 1, kMaxDim);
  if (heads * k_dim > kMaxDim) {
    throw std::invalid_argument(
        "pkm::MemoryConfig: heads * k_dim = " + std::to_string(heads * k_dim) +
        " is out of range; expected <= " + std::to_string(kMaxDim));
  }
  if (memory_plus && !value_projection) {
    throw std::invalid_argument(
        "pkm::MemoryConfig: memory_plus = true needs value_projection = true "
        "(Memory+ computes W2 (y * silu(W1 x + b1)) + b2)");
  }
  if (!value_projection && output_dim != v_dim) {
    throw std::invalid_argument("pkm::MemoryConfig: output_dim = " + std::to_string(output_dim) +
                                " must equal v_dim = " + std::to_string(v_dim) +
                                " when value_projection = false");
  }
  for (const auto& [field, d] : detail::product_dtypes(*this)) {
    if (d != Dtype::f32 && d != Dtype::bf16) {
      throw std::invalid_argument(std::string("pkm::MemoryConfig: ") + field + " = " +
                                  dtype_name(d) + " is not supported; expected F32 or BF16");
    }
  }
  if (score_activation != ScoreActivation::softmax && score_activation != ScoreActivation::relu) {
    throw std::invalid_argument("pkm::MemoryConfig: score_activation = " +
                                std::to_string(static_cast<int>(score_activation)) +
                                " is not supported; expected softmax (0) or relu (1)");
  }
  if (qk_norm_scale) {
    const double s = *qk_norm_scale;
    // The scale is applied in the layer's scalar type, float included: it must be finite
    // and non-zero there too (1e300 is a finite double but inf as a float).
    const float sf = static_cast<float>(s);
    if (!(std::isfinite(s) && s > 0.0 && std::isfinite(sf) && sf > 0.0f)) {
      throw std::invalid_argument("pkm::MemoryConfig: qk_norm_scale = " + std::to_string(s) +
                                  " is out of range; expected a value > 0 that is finite and "
                                  "non-zero as a float");
    }
  }
}

/// Throws std::invalid_argument where a layer of scalar type S cannot run c's compute
/// precision (bf16 products are for float layers).
template <class S>
void check_compute(const MemoryConfig& c) {
  if constexpr (!std::is_same_v<S, float>) {
    for (const auto& [field, d] : detail::product_dtypes(c)) {
      if (d != Dtype::f32) {
        throw std::invalid_argument(std::string("pkm::MemoryConfig: ") + field + " = " +
                                    dtype_name(d) +
                                    " needs a float layer; this layer's scalar is double "
                                    "(expected " + field + " = F32)");
      }
    }
  }
}

inline bool operator==(const MemoryConfig& a, const MemoryConfig& b) {
  return a.fields() == b.fields();
}
inline bool operator!=(const MemoryConfig& a, const MemoryConfig& b) { return !(a == b); }

}  // namespace pkm
