// pkm/packed_weights.hpp — a float layer's weights rounded to bf16 and packed for its bf16
// products once per change of the parameters: the forward weights (Wq, W1, W2) when its
// products are bf16 ones (MemoryConfig::compute = Dtype::bf16), and the sub-keys' 2H halves
// when its half scores are (MemoryConfig::score_compute = Dtype::bf16, without qk-norm: the
// normalised keys are made per call), on a CPU with AVX512-BF16 or under its emulation.
//
// Without them every forward reads each fp32 weight and packs it into bf16 panels again:
// 2 x the bytes of a bf16 copy, plus the packing, on every call. That cost does not shrink
// with the batch, so a decoding model (1-64 tokens a call) paid more for it than for the
// products. The packed copies cost half the weights' fp32 bytes in memory; they give the
// same bits as packing on every call.
//
// They are kept on the parameters' ModificationStamp with the version they were made at:
// every non-const access to the parameters and every optimizer step makes them stale, and
// the next forward packs again. (Code that writes the values through pointers of its own
// calls LayerParameters::mark_modified(), as it already must for the finiteness check.)
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "pkm/dtype.hpp"
#include "pkm/gemm_bf16.hpp"
#include "pkm/key_search.hpp"
#include "pkm/parameters.hpp"

namespace pkm {

namespace detail {
/// The packed copies of one version of a layer's weights: one per tensor of kTensors (empty
/// where the products are fp32 or the config has no such tensor), and the sub-keys' halves.
struct PackedLayerWeights {
  static constexpr std::array<Tensor, 3> kTensors = {Tensor::query_weight, Tensor::swilu_weight,
                                                     Tensor::value_proj_weight};
  std::array<PackedBf16Matrix, 3> matrices;
  /// Head h's half t of the sub-keys (n_keys x half) at [2 h + t], as key_search_forward
  /// takes them; empty where the half scores are fp32 ones or qk-normalised.
  std::vector<PackedBf16Matrix> key_halves;
  /// The packed copy of tensor t, or null for a tensor that is not packed.
  const PackedBf16Matrix* of(Tensor t) const {
    for (std::size_t i = 0; i < kTensors.size(); ++i)
      if (kTensors[i] == t && matrices[i].rows() > 0) return &matrices[i];
    return nullptr;
  }
};
}  // namespace detail

/// What a forward's products use: the packed weights, held for the whole call (a concurrent
/// change of the parameters cannot free them under it), and scratch for the batch's packed
/// rows, reused from call to call. Part of the ForwardCache.
struct ProductScratch {
  std::shared_ptr<const detail::PackedLayerWeights> packed;
  std::vector<std::uint16_t> x_pack;
  /// The packed copy of weight t for this forward, or null (nothing packed: fp32 products).
  const PackedBf16Matrix* of(Tensor t) const { return packed ? packed->of(t) : nullptr; }
  /// The sub-keys' packed halves for this forward, or null (the key search packs its own).
  const std::vector<PackedBf16Matrix>* key_halves() const {
    return packed && !packed->key_halves.empty() ? &packed->key_halves : nullptr;
  }
};

/// True where a forward of `p` multiplies its weights (Wq, W1, W2) in bf16.
template <class S>
bool packs_weights(const LayerParameters<S>& p) {
  return std::is_same_v<S, float> && p.config().compute == Dtype::bf16 && bf16_products_here();
}

/// True where a forward of `p` computes its half scores against the sub-keys as they are
/// stored, in bf16 (score_compute = BF16 without qk-norm).
template <class S>
bool packs_keys(const LayerParameters<S>& p) {
  return detail::bf16_half_scores<S>(p.config()) && !p.config().qk_norm;
}

/// The weights of `p` packed for bf16 products at p's current values: the copies made for
/// this version of the values if there are any, else made now (and kept for the next
/// forward). Null where no product is a bf16 one against a stored weight: compute and
/// score_compute F32 (or score_compute BF16 with qk-norm), double parameters, a CPU without
/// AVX512-BF16 (unless PKM_BF16_KERNEL=portable), or a moved-from LayerParameters.
template <class S>
std::shared_ptr<const detail::PackedLayerWeights> packed_weights(const LayerParameters<S>& p) {
  if constexpr (!std::is_same_v<S, float>) {
    (void)p;
    return nullptr;
  } else {
    const bool weights = packs_weights(p), keys = packs_keys(p);
    if ((!weights && !keys) || !p.stamp()) return nullptr;
    using Packed = detail::PackedLayerWeights;
    const MemoryConfig& c = p.config();
    const Index halves = 2 * c.heads, n = c.n_keys, half = c.half();
    const detail::ModificationStamp& stamp = *p.stamp();
    const std::uint64_t version = stamp.version();
    // Made for these very buffers and this config (a view re-pointed under the same stamp,
    // or a changed compute / score_compute, packs again).
    auto made_from_p = [&](const Packed& packed) {
      for (std::size_t i = 0; i < Packed::kTensors.size(); ++i) {
        const PackedBf16Matrix& m = packed.matrices[i];
        if (!weights || !p.has(Packed::kTensors[i])) {
          if (m.rows() != 0) return false;
          continue;
        }
        const auto w = p.matrix(Packed::kTensors[i]);
        if (m.source() != w.data() || m.rows() != w.rows() || m.cols() != w.cols()) return false;
      }
      if (!keys) return packed.key_halves.empty();
      return !detail::key_halves_mismatch(c, p.keys().data(), packed.key_halves);
    };
    if (auto packed = stamp.packed(version); packed && made_from_p(*packed)) return packed;
    auto made = std::make_shared<Packed>();
    for (std::size_t i = 0; weights && i < Packed::kTensors.size(); ++i) {
      if (!p.has(Packed::kTensors[i])) continue;
      const auto w = p.matrix(Packed::kTensors[i]);
      made->matrices[i] = PackedBf16Matrix(w.data(), w.rows(), w.cols(), w.cols());
    }
    if (keys) {
      made->key_halves.resize(static_cast<std::size_t>(halves));
      for (Index i = 0; i < halves; ++i) {
        made->key_halves[static_cast<std::size_t>(i)].assign(p.keys().data() + i * n * half, n,
                                                             half, half);
      }
    }
    stamp.set_packed(made, version);
    return made;
  }
}

}  // namespace pkm
