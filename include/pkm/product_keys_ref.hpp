// pkm/product_keys_ref.hpp — the reference of pkm/product_keys.hpp: the brute-force search
// over all n^2 sums that the exact product-key top-k must equal (the tests prove it). Not part
// of pkm/pkm.hpp; include it where you compare.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "pkm/product_keys.hpp"

namespace pkm {

/// The reference: ranks all n^2 sums and keeps the k best. O(n^2 log k); for tests.
template <class S>
void product_key_topk_brute_force(const S* s1, const S* s2, Index n, Index k, std::int64_t* slots,
                                  S* scores) {
  using C = typename ProductKeyScratch<S>::Candidate;
  std::vector<C> all;
  all.reserve(static_cast<std::size_t>(n * n));
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < n; ++j) all.push_back(C{s1[i] + s2[j], s1[i], s2[j], i, j, 0, 0});
  auto before = [](const C& x, const C& y) { return detail::ranks_before(x, y); };
  std::partial_sort(all.begin(), all.begin() + k, all.end(), before);
  for (Index m = 0; m < k; ++m) {
    slots[m] = static_cast<std::int64_t>(all[m].i * n + all[m].j);
    scores[m] = all[m].sum;
  }
}

}  // namespace pkm
