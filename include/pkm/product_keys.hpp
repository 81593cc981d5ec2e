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

#include "pkm/detail/topk_kernels.hpp"
#include "pkm/types.hpp"

namespace pkm {

/// Scratch space for product_key_topk; reuse one per thread to avoid allocations.
template <class S>
struct ProductKeyScratch {
  struct Candidate {
    S sum, s1, s2;
    Index i, j;  // sub-key ids
    Index a, b;  // ranks in the two half lists
  };
  detail::HalfTopkScratch<S> half;
  std::vector<Index> top1, top2;
  std::vector<S> best1, best2;            // the half scores of top1, top2
  std::vector<std::uint64_t> frontier;    // float: one key per row of the grid
  std::vector<Candidate> heap;            // double: the merge's heap
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

/// The k best of n scores by (score desc, index asc), in that order, into `out` (1 <= k <= n,
/// n < 2^32, no NaN). A threshold pass keeps the few scores that can be among the k best, and
/// they are ranked by one integer key each (pkm/detail/topk_kernels.hpp). On a CPU with AVX-512
/// float scores run its 16-lane kernel (when k is a multiple of 16), else plain C++; both give
/// the same indices.
template <class S>
void half_topk(const S* s, Index n, Index k, Index* out, ProductKeyScratch<S>& scratch) {
  if constexpr (std::is_same_v<S, float>) {
    if (k % 16 == 0 && n >= 2 * k && detail::cpu_has_topk_avx512()) {
#ifdef PKM_X86_TOPK_KERNEL
      detail::half_topk_avx512(s, n, k, out, scratch.half);
      return;
#endif
    }
  }
  detail::half_topk_portable(s, n, k, out, scratch.half);
}

/// Exact top-k of the n^2 sums s1[i] + s2[j]: writes slots (i * n + j) and their scores,
/// best first. After the two half selections, the candidates are the k x k grid of their
/// sorted lists (row a: the a-th best of s1 with each of the k best of s2, a row sorted by
/// itself), merged k-way: O(n + k^2) per call. Scores must be finite.
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
    // Between two grid cells of equal sum, the order "s1 desc, i asc" is the order of their
    // rows a (top1 is sorted by it) and "s2 desc, j asc" that of their columns b. So one
    // 64-bit key (sum, then a asc, then b asc; a, b < 2^16, see kMaxKeys) ranks the grid as
    // ranks_before does. The frontier holds each started row's next cell; the best of it is
    // the next output. Row a + 1 starts when row a's first cell is taken (it cannot come
    // before), and a row that is used up holds 0, below every cell's key.
    scratch.best1.resize(static_cast<std::size_t>(k));
    scratch.best2.resize(static_cast<std::size_t>(k));
    scratch.frontier.resize(static_cast<std::size_t>(k));
    float* v1 = scratch.best1.data();
    float* v2 = scratch.best2.data();
    for (Index a = 0; a < k; ++a) {
      v1[a] = s1[t1[a]];
      v2[a] = s2[t2[a]];
    }
    auto key = [&](Index a, Index b) {
      return (std::uint64_t(detail::ordered_bits(v1[a] + v2[b])) << 32) |
             (std::uint64_t(0xFFFFu - std::uint32_t(a)) << 16) |
             std::uint64_t(0xFFFFu - std::uint32_t(b));
    };
    std::uint64_t* f = scratch.frontier.data();
    f[0] = key(0, 0);
    Index rows = 1;
    for (Index m = 0; m < k; ++m) {
      std::uint64_t best = 0;
      for (Index a = 0; a < rows; ++a) best = f[a] > best ? f[a] : best;
      const Index a = Index(0xFFFFu - std::uint32_t((best >> 16) & 0xFFFFu));
      const Index b = Index(0xFFFFu - std::uint32_t(best & 0xFFFFu));
      slots[m] = static_cast<std::int64_t>(t1[a] * n + t2[b]);
      scores[m] = v1[a] + v2[b];
      f[a] = b + 1 < k ? key(a, b + 1) : 0;
      if (b == 0 && rows < k) {
        f[rows] = key(rows, 0);
        ++rows;
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
