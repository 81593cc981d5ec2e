// pkm/product_keys.hpp — the exact product-key top-k (Lample et al., 2019), forward and
// backward (the brute-force search it must equal is pkm/product_keys_ref.hpp).
//
// Given the half scores s1 (n) and s2 (n) of one head, the candidate (i, j) is memory slot
// i * n + j with score s1[i] + s2[j]. Candidates are ranked by the strict total order
//     sum desc, then s1 desc, then i asc, then s2 desc, then j asc,
// which every function here uses. Under it, the k best of all n^2 slots always lie in
// I1 x I2, where I1 and I2 are the top-k of each half (ranked by score desc, index asc) —
// also when rounding makes two different sums equal — so the search is exact.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#include "pkm/types.hpp"

namespace pkm {

namespace detail {
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
}  // namespace detail

/// Scratch space for product_key_topk; reuse one per thread to avoid allocations.
template <class S>
struct ProductKeyScratch {
  struct Candidate {
    S sum, s1, s2;
    Index i, j;  // sub-key ids
    Index a, b;  // ranks in the two half lists
  };
  std::vector<typename detail::RankKey<S>::type> half_candidates;
  struct KeyedCandidate {
    detail::uint128 key;
    std::int32_t a, b;
  };
  std::vector<KeyedCandidate> fast_heap;
  std::vector<Index> top1, top2;
  std::vector<Candidate> heap;
  std::vector<S> group_max;
};

namespace detail {
/// true if candidate x ranks before y in the order documented above.
template <class C>
bool ranks_before(const C& x, const C& y) {
  if (x.sum != y.sum) return x.sum > y.sum;
  if (x.s1 != y.s1) return x.s1 > y.s1;
  if (x.i != y.i) return x.i < y.i;
  if (x.s2 != y.s2) return x.s2 > y.s2;
  return x.j < y.j;
}
}  // namespace detail

/// The k best of n scores by (score desc, index asc), in that order, into `out`.
/// A threshold pass first: the n scores are dealt into k strided groups and T is the smallest
/// group maximum, so at least k scores are >= T and every score of the top k is >= T (ties
/// included). One vectorised max pass and one compare per score keep the few candidates
/// >= T, which are then ranked by one integer key each (detail::RankKey). Exact for any input
/// without NaN (n must fit in 32 bits for float scores).
template <class S>
void half_topk(const S* s, Index n, Index k, Index* out, ProductKeyScratch<S>& scratch) {
  using K = detail::RankKey<S>;
  using Key = typename K::type;
  auto& cand = scratch.half_candidates;
  cand.resize(static_cast<std::size_t>(n));
  std::size_t count = 0;
  if (n >= 4 * k) {
    auto& gmax = scratch.group_max;
    gmax.assign(s, s + k);
    const Index full = n / k;
    for (Index t = 1; t < full; ++t) {
      const S* row = s + t * k;
      for (Index j = 0; j < k; ++j) gmax[j] = row[j] > gmax[j] ? row[j] : gmax[j];
    }
    for (Index j = 0; j < n - full * k; ++j)
      gmax[j] = s[full * k + j] > gmax[j] ? s[full * k + j] : gmax[j];
    S threshold = gmax[0];
    for (Index j = 1; j < k; ++j) threshold = gmax[j] < threshold ? gmax[j] : threshold;
    for (Index i = 0; i < n; ++i) {
      cand[count] = K::make(s[i], i);
      count += s[i] >= threshold ? 1 : 0;
    }
  } else {
    for (Index i = 0; i < n; ++i) cand[count++] = K::make(s[i], i);
  }
  const auto first = cand.begin(), kth = first + k,
             last = first + static_cast<std::ptrdiff_t>(count);
  if (count > static_cast<std::size_t>(k))
    std::nth_element(first, kth - 1, last, std::greater<Key>());
  std::sort(first, kth, std::greater<Key>());  // best first
  for (Index m = 0; m < k; ++m) out[m] = K::index(cand[m]);
}

/// Exact top-k of the n^2 sums s1[i] + s2[j]: writes slots (i * n + j) and their scores,
/// best first. A k-way merge over the k x k grid of the two sorted half lists with a heap of
/// k candidates: O(n + k log k) per call after the half selections. Scores must be finite.
template <class S>
void product_key_topk(const S* s1, const S* s2, Index n, Index k, std::int64_t* slots, S* scores,
                      ProductKeyScratch<S>& scratch) {
  using C = typename ProductKeyScratch<S>::Candidate;
  scratch.top1.resize(static_cast<std::size_t>(k));
  scratch.top2.resize(static_cast<std::size_t>(k));
  half_topk(s1, n, k, scratch.top1.data(), scratch);
  half_topk(s2, n, k, scratch.top2.data(), scratch);
  const Index* t1 = scratch.top1.data();
  const Index* t2 = scratch.top2.data();
  if constexpr (std::is_same_v<S, float>) {
    // One 128-bit key per candidate, ordered as ranks_before: sum, s1, i, s2, j (sub-key ids
    // are < 2^16, see kMaxKeys). Integer compares make the heap cheap.
    using Key = detail::uint128;
    using detail::ordered_bits;
    auto key = [&](Index a, Index b) {
      const Index i = t1[a], j = t2[b];
      const std::uint64_t hi =
          (std::uint64_t(ordered_bits(s1[i] + s2[j])) << 32) | ordered_bits(s1[i]);
      const std::uint64_t lo = (std::uint64_t(0xFFFFu - std::uint32_t(i)) << 48) |
                               (std::uint64_t(ordered_bits(s2[j])) << 16) |
                               std::uint64_t(0xFFFFu - std::uint32_t(j));
      return (Key(hi) << 64) | Key(lo);
    };
    auto& heap = scratch.fast_heap;
    heap.clear();
    for (Index a = 0; a < k; ++a) heap.push_back({key(a, 0), std::int32_t(a), 0});
    auto lower = [](const typename ProductKeyScratch<S>::KeyedCandidate& x,
                    const typename ProductKeyScratch<S>::KeyedCandidate& y) {
      return x.key < y.key;
    };
    std::make_heap(heap.begin(), heap.end(), lower);
    for (Index m = 0; m < k; ++m) {
      std::pop_heap(heap.begin(), heap.end(), lower);
      const auto best = heap.back();
      heap.pop_back();
      const Index i = t1[best.a], j = t2[best.b];
      slots[m] = static_cast<std::int64_t>(i * n + j);
      scores[m] = s1[i] + s2[j];
      if (best.b + 1 < k) {
        heap.push_back({key(best.a, best.b + 1), best.a, best.b + 1});
        std::push_heap(heap.begin(), heap.end(), lower);
      }
    }
    return;
  }
  auto make = [&](Index a, Index b) {
    const Index i = t1[a], j = t2[b];
    return C{s1[i] + s2[j], s1[i], s2[j], i, j, a, b};
  };
  // Max-heap: the comparator says "x ranks after y".
  auto after = [](const C& x, const C& y) { return detail::ranks_before(y, x); };
  auto& heap = scratch.heap;
  heap.clear();
  for (Index a = 0; a < k; ++a) heap.push_back(make(a, 0));  // row a of the grid, column 0
  std::make_heap(heap.begin(), heap.end(), after);
  for (Index m = 0; m < k; ++m) {
    std::pop_heap(heap.begin(), heap.end(), after);
    const C best = heap.back();
    heap.pop_back();
    slots[m] = static_cast<std::int64_t>(best.i * n + best.j);
    scores[m] = best.sum;
    if (best.b + 1 < k) {  // next candidate in the same grid row
      heap.push_back(make(best.a, best.b + 1));
      std::push_heap(heap.begin(), heap.end(), after);
    }
  }
}

/// Backward of the selection: the gradient dz[m] of the score of slot[m] = i*n + j flows to
/// s1[i] and to s2[j]. Calls fn(half, sub_key, dz[m]) for half 0 (id i) and 1 (id j), in m order.
template <class S, class F>
void product_key_backward(const std::int64_t* slots, const S* dz, Index k, Index n, F&& fn) {
  for (Index m = 0; m < k; ++m) {
    fn(0, static_cast<Index>(slots[m] / n), dz[m]);
    fn(1, static_cast<Index>(slots[m] % n), dz[m]);
  }
}

}  // namespace pkm
