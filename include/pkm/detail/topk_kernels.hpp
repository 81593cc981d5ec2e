// pkm/detail/topk_kernels.hpp — the inner loops of the exact half top-k (pkm/product_keys.hpp):
// the k best of n scores by (score desc, index asc), best first.
//
// Both kernels run the same steps, and so return the same indices (the order is total, so any
// exact selection does):
//   1. Threshold: the n scores dealt into k strided groups; T = the smallest group maximum. At
//      least k scores are >= T (each group's maximum), so every score of the top k is >= T,
//      ties included.
//   2. Compaction: the (score, index) pairs with score >= T, in index order.
//   3. Refinement: steps 1-2 again over the candidates while there are at least 2k of them and
//      a pass drops some (equal scores can stop it).
//   4. Ranking: one integer key per candidate (RankKey: the score's bits made monotone above
//      the complemented index), and each candidate's rank is the number of keys above its own;
//      rank r < k goes to out[r]. Beyond kRankCountMax candidates (many equal scores), an
//      nth_element and a sort of the keys instead.
// `avx512` does steps 1-2 with 16-lane compares and vcompressps (compressed into a register,
// then stored, which Zen 4 also runs fast) and step 4 on 8 candidates' keys per register.
// `portable` is plain C++ for any CPU and for double scores. Scores must not be NaN.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define PKM_X86_TOPK_KERNEL 1
#endif

#include "pkm/types.hpp"

namespace pkm::detail {

/// 128-bit unsigned integer (a GCC/Clang extension).
__extension__ typedef unsigned __int128 uint128;

/// The bits of a finite score as an unsigned integer of the same order (-0 and +0 equal).
inline std::uint32_t ordered_bits(float v) {
  v += 0.0f;  // -0 -> +0
  std::uint32_t u;
  std::memcpy(&u, &v, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline std::uint64_t ordered_bits(double v) {
  v += 0.0;
  std::uint64_t u;
  std::memcpy(&u, &v, 8);
  return (u >> 63) ? ~u : (u | (std::uint64_t(1) << 63));
}

/// An integer whose order is "score descending, then index ascending" for (score, index):
/// the score's bits made monotone (floats: flip the sign bit, or all bits of negatives) in the
/// high part, the complemented index in the low part. +0 and -0 give the same key.
template <class S>
struct RankKey;
template <>
struct RankKey<float> {
  using type = std::uint64_t;
  static type make(float s, Index i) {
    return (type(ordered_bits(s)) << 32) | type(0xFFFFFFFFu - std::uint32_t(i));
  }
  static Index index(type k) { return Index(0xFFFFFFFFu - std::uint32_t(k)); }
};
template <>
struct RankKey<double> {
  using type = uint128;
  static type make(double s, Index i) {
    return (type(ordered_bits(s)) << 64) | type(~std::uint64_t(i));
  }
  static Index index(type k) { return Index(~std::uint64_t(k)); }
};

/// Beyond this many candidates the ranking sorts instead of counting (quadratic) ranks.
inline constexpr Index kRankCountMax = 128;

/// What a half top-k keeps between calls (one per thread; no allocation once warm).
template <class S>
struct HalfTopkScratch {
  std::vector<S> scores;             ///< candidates' scores (n + 16: the kernel's stores)
  std::vector<std::uint32_t> ids;    ///< their indices
  std::vector<typename RankKey<S>::type> keys;
  std::vector<S> group_max;
  void reserve(Index n, Index k) {
    const auto size = static_cast<std::size_t>(n + 16);
    scores.resize(size);
    ids.resize(size);
    keys.resize(size);
    group_max.resize(static_cast<std::size_t>(k));
  }
};

/// Step 1: the smallest of the maxima of n scores dealt into k strided groups (n >= k).
template <class S>
S group_threshold(const S* s, Index n, Index k, S* g) {
  for (Index j = 0; j < k; ++j) g[j] = s[j];
  const Index full = n / k;
  for (Index t = 1; t < full; ++t) {
    const S* row = s + t * k;
    for (Index j = 0; j < k; ++j) g[j] = row[j] > g[j] ? row[j] : g[j];
  }
  for (Index j = 0; j < n - full * k; ++j)
    g[j] = s[full * k + j] > g[j] ? s[full * k + j] : g[j];
  S t = g[0];
  for (Index j = 1; j < k; ++j) t = g[j] < t ? g[j] : t;
  return t;
}

/// The first c candidates' rank keys, into sc.keys.
template <class S>
typename RankKey<S>::type* candidate_keys(HalfTopkScratch<S>& sc, Index c) {
  auto* keys = sc.keys.data();
  for (Index m = 0; m < c; ++m)
    keys[m] = RankKey<S>::make(sc.scores[std::size_t(m)], sc.ids[std::size_t(m)]);
  return keys;
}

/// Step 4: out[0, k) = the candidates' ids, best first.
template <class S>
void rank_candidates(HalfTopkScratch<S>& sc, Index c, Index k, Index* out) {
  using K = RankKey<S>;
  using Key = typename K::type;
  Key* keys = candidate_keys(sc, c);
  if (c <= kRankCountMax) {
    for (Index m = 0; m < c; ++m) {
      const Key km = keys[m];
      Index r = 0;
      for (Index j = 0; j < c; ++j) r += keys[j] > km ? 1 : 0;
      if (r < k) out[r] = K::index(km);
    }
    return;
  }
  std::nth_element(keys, keys + (k - 1), keys + c, std::greater<Key>());
  std::sort(keys, keys + k, std::greater<Key>());
  for (Index m = 0; m < k; ++m) out[m] = K::index(keys[m]);
}

/// The portable kernel (any CPU, float or double). 1 <= k <= n.
template <class S>
void half_topk_portable(const S* s, Index n, Index k, Index* out, HalfTopkScratch<S>& sc) {
  sc.reserve(n, k);
  S* cs = sc.scores.data();
  std::uint32_t* ci = sc.ids.data();
  Index c = 0;
  if (n >= 2 * k) {
    const S t = group_threshold(s, n, k, sc.group_max.data());
    for (Index i = 0; i < n; ++i) {
      cs[c] = s[i];
      ci[c] = std::uint32_t(i);
      c += s[i] >= t ? 1 : 0;
    }
    while (c >= 2 * k) {
      const S t2 = group_threshold(cs, c, k, sc.group_max.data());
      Index kept = 0;
      for (Index i = 0; i < c; ++i) {  // in place: kept <= i
        const S v = cs[i];
        const std::uint32_t id = ci[i];
        cs[kept] = v;
        ci[kept] = id;
        kept += v >= t2 ? 1 : 0;
      }
      if (kept == c) break;
      c = kept;
    }
  } else {
    for (Index i = 0; i < n; ++i) {
      cs[i] = s[i];
      ci[i] = std::uint32_t(i);
    }
    c = n;
  }
  rank_candidates(sc, c, k, out);
}

#ifdef PKM_X86_TOPK_KERNEL
#define PKM_TOPK_AVX512 __attribute__((target("avx512f,avx512vl,popcnt")))

/// True where the CPU runs the avx512 kernel.
inline bool cpu_has_topk_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("popcnt");
}

/// Step 1 with 16-lane maxima (k a multiple of 16, n >= k).
PKM_TOPK_AVX512 inline float group_threshold_avx512(const float* s, Index n, Index k, float* g) {
  const Index full = n / k;
  for (Index j = 0; j < k; j += 16) {
    __m512 m = _mm512_loadu_ps(s + j);
    for (Index t = 1; t < full; ++t) m = _mm512_max_ps(m, _mm512_loadu_ps(s + t * k + j));
    _mm512_storeu_ps(g + j, m);
  }
  for (Index j = 0; j < n - full * k; ++j)
    g[j] = s[full * k + j] > g[j] ? s[full * k + j] : g[j];
  __m512 m = _mm512_loadu_ps(g);
  for (Index j = 16; j < k; j += 16) m = _mm512_min_ps(m, _mm512_loadu_ps(g + j));
  return _mm512_reduce_min_ps(m);
}

/// Step 2: the pairs (s[i], ids ? ids[i] : i) with s[i] >= t, in order, to (ds, di); returns
/// their count. ds/di may be s/ids themselves (each store lands at or before what it read),
/// and get up to 16 values written past the count.
PKM_TOPK_AVX512 inline Index compact_avx512(const float* s, const std::uint32_t* ids, Index n,
                                            float t, float* ds, std::uint32_t* di) {
  const __m512 vt = _mm512_set1_ps(t);
  const __m512i iota =
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  Index c = 0, i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(s + i);
    const __mmask16 keep = _mm512_cmp_ps_mask(v, vt, _CMP_GE_OQ);
    const __m512i id = ids ? _mm512_loadu_si512(ids + i)
                           : _mm512_add_epi32(iota, _mm512_set1_epi32(std::int32_t(i)));
    _mm512_storeu_ps(ds + c, _mm512_maskz_compress_ps(keep, v));
    _mm512_storeu_si512(di + c, _mm512_maskz_compress_epi32(keep, id));
    c += _mm_popcnt_u32(keep);
  }
  for (; i < n; ++i) {
    const float v = s[i];
    const std::uint32_t id = ids ? ids[i] : std::uint32_t(i);
    ds[c] = v;
    di[c] = id;
    c += v >= t ? 1 : 0;
  }
  return c;
}

/// Step 4 for at most kRankCountMax candidates: ranks of 8 keys at a time.
PKM_TOPK_AVX512 inline void rank_candidates_avx512(HalfTopkScratch<float>& sc, Index c, Index k,
                                                   Index* out) {
  const std::uint64_t* keys = candidate_keys(sc, c);
  const __m512i one = _mm512_set1_epi64(1);
  alignas(64) std::int64_t ranks[8];
  for (Index m0 = 0; m0 < c; m0 += 8) {
    const __mmask8 live = static_cast<__mmask8>(c - m0 >= 8 ? 0xFF : (1u << (c - m0)) - 1);
    const __m512i km = _mm512_maskz_loadu_epi64(live, keys + m0);
    __m512i r = _mm512_setzero_si512();
    for (Index j = 0; j < c; ++j) {
      const __mmask8 above =
          _mm512_cmpgt_epu64_mask(_mm512_set1_epi64(static_cast<long long>(keys[j])), km);
      r = _mm512_mask_add_epi64(r, above, r, one);
    }
    _mm512_store_si512(ranks, r);
    for (Index l = 0; l < 8 && m0 + l < c; ++l)
      if (ranks[l] < k) out[ranks[l]] = RankKey<float>::index(keys[m0 + l]);
  }
}

/// The avx512 kernel: float scores, k a multiple of 16, 2k <= n, n < 2^32.
PKM_TOPK_AVX512 inline void half_topk_avx512(const float* s, Index n, Index k, Index* out,
                                             HalfTopkScratch<float>& sc) {
  sc.reserve(n, k);
  float* cs = sc.scores.data();
  std::uint32_t* ci = sc.ids.data();
  Index c = compact_avx512(s, nullptr, n, group_threshold_avx512(s, n, k, sc.group_max.data()),
                           cs, ci);
  while (c >= 2 * k) {
    const Index kept =
        compact_avx512(cs, ci, c, group_threshold_avx512(cs, c, k, sc.group_max.data()), cs, ci);
    if (kept == c) break;
    c = kept;
  }
  if (c <= kRankCountMax)
    rank_candidates_avx512(sc, c, k, out);
  else
    rank_candidates(sc, c, k, out);
}
#undef PKM_TOPK_AVX512
#else
inline bool cpu_has_topk_avx512() { return false; }
#endif

}  // namespace pkm::detail
