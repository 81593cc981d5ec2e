#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include <pkm/pkm.hpp>
#include <pkm/product_keys_ref.hpp>

#include "support.hpp"

using pkm::Index;

namespace {
template <class S>
void expect_equal_to_brute_force(const std::vector<S>& s1, const std::vector<S>& s2, Index n,
                                 Index k, pkm::ProductKeyScratch<S>& scratch) {
  std::vector<std::int64_t> fast(k), slow(k);
  std::vector<S> fs(k), ss(k);
  pkm::product_key_topk(s1.data(), s2.data(), n, k, fast.data(), fs.data(), scratch);
  pkm::product_key_topk_brute_force(s1.data(), s2.data(), n, k, slow.data(), ss.data());
  INFO("n = " << n << ", k = " << k);
  REQUIRE(fast == slow);
  REQUIRE(fs == ss);
  for (Index m = 1; m < k; ++m) REQUIRE(fs[m - 1] >= fs[m]);
}
}  // namespace

TEST_CASE("product-key top-k equals brute force on random half scores", "[product_keys]") {
  std::mt19937_64 rng(7);
  pkm::ProductKeyScratch<float> sf;
  pkm::ProductKeyScratch<double> sd;
  for (Index n : {1, 2, 3, 4, 7, 16, 33, 64, 100}) {
    for (Index k : {Index(1), Index(2), Index(5), n / 2, n - 1, n}) {
      if (k < 1 || k > n) continue;
      for (int rep = 0; rep < 5; ++rep) {
        std::normal_distribution<double> g;
        std::vector<float> a(n), b(n);
        std::vector<double> ad(n), bd(n);
        for (Index i = 0; i < n; ++i) {
          ad[i] = g(rng);
          bd[i] = g(rng);
          a[i] = float(ad[i]);
          b[i] = float(bd[i]);
        }
        expect_equal_to_brute_force(a, b, n, k, sf);
        expect_equal_to_brute_force(ad, bd, n, k, sd);
      }
    }
  }
}

TEST_CASE("product-key top-k is exact with many tied scores", "[product_keys]") {
  // Scores on a coarse grid: many equal half scores and many equal sums.
  std::mt19937_64 rng(11);
  std::uniform_int_distribution<int> level(-3, 3);
  pkm::ProductKeyScratch<float> scratch;
  for (Index n : {4, 8, 13, 32}) {
    for (Index k = 1; k <= n; ++k) {
      std::vector<float> a(n), b(n);
      for (Index i = 0; i < n; ++i) {
        a[i] = 0.5f * float(level(rng));
        b[i] = 0.5f * float(level(rng));
      }
      expect_equal_to_brute_force(a, b, n, k, scratch);
    }
  }
  // All scores equal: the k lowest slot ids win, in order.
  std::vector<float> zeros(6, 0.0f);
  std::vector<std::int64_t> slots(4);
  std::vector<float> sc(4);
  pkm::product_key_topk(zeros.data(), zeros.data(), 6, 4, slots.data(), sc.data(), scratch);
  CHECK(slots == std::vector<std::int64_t>{0, 1, 2, 3});
}

TEST_CASE("product-key top-k is exact when rounding makes different sums equal", "[product_keys]") {
  // 1 + 2^-23 > 1, yet both plus 1e8 round to the same float: equal sums, different s1.
  const float big = 1.0f + std::ldexp(1.0f, -23), one = 1.0f;
  std::vector<float> s1 = {one, big, 0.0f}, s2 = {1.0e8f, 0.0f, -1.0f};
  pkm::ProductKeyScratch<float> scratch;
  for (Index k = 1; k <= 3; ++k) expect_equal_to_brute_force(s1, s2, 3, k, scratch);
}

TEST_CASE("the layer's selection is the exact top-k over all slots", "[product_keys][layer]") {
  // Heads 1-4, n_keys 4-64, knn from 1 to n_keys, qk-norm on and off: the indices of the
  // double layer equal a brute-force search over all n_keys^2 slots in plain loops.
  std::mt19937_64 rng(3);
  int configs = 0;
  for (Index heads = 1; heads <= 4; ++heads) {
    for (Index n : {4, 9, 16, 37, 64}) {
      for (bool qk : {false, true}) {
        std::uniform_int_distribution<Index> pick_k(1, n);
        for (Index k : {Index(1), pick_k(rng), n}) {
          pkm::MemoryConfig c;
          c.input_dim = 12;
          c.heads = heads;
          c.n_keys = n;
          c.k_dim = 8;
          c.knn = k;
          c.v_dim = 4;
          c.output_dim = 6;
          c.qk_norm = qk;
          pkm::MemoryLayer<double> layer(c, 100 + configs);
          const auto x = pkmtest::random_matrix(9, c.input_dim, 200 + configs);
          pkm::ForwardCache<double> cache;
          const auto out = layer.forward(x, cache);
          const auto ref = pkmtest::reference_forward(c, layer.params(), layer.values(), x);
          INFO("heads " << heads << " n_keys " << n << " knn " << k << " qk_norm " << qk);
          REQUIRE(cache.indices == ref.indices);
          REQUIRE((cache.weights - ref.weights).cwiseAbs().maxCoeff() < 1e-12);
          REQUIRE((out - ref.out).cwiseAbs().maxCoeff() < 1e-10);
          ++configs;
        }
      }
    }
  }
  CHECK(configs == 4 * 5 * 2 * 3);
}

TEST_CASE("product-key top-k is exact at the paper's n_keys with ties and signed zeros",
          "[product_keys]") {
  // n = 512, k = 32: the threshold pass of the half selection is in play. Coarse levels make
  // many scores equal to the threshold itself; -0 and +0 must rank as equal.
  std::mt19937_64 rng(13);
  std::uniform_int_distribution<int> level(-6, 6);
  pkm::ProductKeyScratch<float> scratch;
  for (int rep = 0; rep < 4; ++rep) {
    const Index n = 512;
    std::vector<float> a(n), b(n);
    for (Index i = 0; i < n; ++i) {
      a[i] = 0.25f * float(level(rng));
      b[i] = rep == 3 ? 0.0f : 0.25f * float(level(rng));
      if (a[i] == 0.0f && (i % 2)) a[i] = -0.0f;
    }
    for (Index k : {1, 8, 32, 100}) expect_equal_to_brute_force(a, b, n, k, scratch);
  }
}

namespace {
// The k best of n scores by (score desc, index asc), by sorting all of them.
std::vector<Index> half_topk_by_sorting(const std::vector<float>& s, Index k) {
  std::vector<Index> order(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) order[i] = Index(i);
  std::stable_sort(order.begin(), order.end(), [&](Index x, Index y) {
    return s[std::size_t(x)] > s[std::size_t(y)];  // -0 == +0: index order kept
  });
  order.resize(std::size_t(k));
  return order;
}
}  // namespace

TEST_CASE("both half top-k kernels equal a sort on hostile score rows", "[product_keys]") {
  // Rows meant to defeat the threshold passes: all equal, two levels, sorted up and down,
  // one huge outlier, many scores equal to the threshold, signed zeros, denormals and
  // +-FLT_MAX. The avx512 kernel runs where the CPU has it (k a multiple of 16).
  std::mt19937_64 rng(17);
  std::normal_distribution<float> g;
  pkm::detail::HalfTopkScratch<float> scratch;
  const bool avx512 = pkm::detail::cpu_has_topk_avx512();
  int rows = 0;
  for (Index n : {16, 31, 32, 33, 64, 100, 257, 512, 1000}) {
    for (int kind = 0; kind < 9; ++kind) {
      std::vector<float> s(std::size_t(n), 0.0f);
      for (Index i = 0; i < n; ++i) {
        const float r = g(rng);
        float& v = s[std::size_t(i)];
        switch (kind) {
          case 0: v = r; break;
          case 1: v = 1.0f; break;
          case 2: v = (i % 3 == 0) ? 2.0f : -2.0f; break;
          case 3: v = float(i); break;
          case 4: v = -float(i); break;
          case 5: v = i == n / 2 ? 1e30f : r * 1e-3f; break;
          case 6: v = std::round(r * 2.0f) / 2.0f; break;
          case 7: v = (i % 2) ? -0.0f : 0.0f; if (i % 5 == 0) v = 1e-40f; break;
          case 8: v = (i % 4 == 0) ? std::numeric_limits<float>::max()
                                   : (i % 4 == 1 ? -std::numeric_limits<float>::max() : r);
                  break;
        }
      }
      for (Index k : {Index(1), Index(5), Index(16), Index(32), n / 2, n}) {
        if (k < 1 || k > n) continue;
        const auto want = half_topk_by_sorting(s, k);
        std::vector<Index> got(std::size_t(k), -1);
        pkm::detail::half_topk_portable(s.data(), n, k, got.data(), scratch);
        INFO("n " << n << " kind " << kind << " k " << k);
        REQUIRE(got == want);
#ifdef PKM_X86_TOPK_KERNEL
        if (avx512 && k % 16 == 0 && n >= 2 * k) {
          std::fill(got.begin(), got.end(), -1);
          pkm::detail::half_topk_avx512(s.data(), n, k, got.data(), scratch);
          REQUIRE(got == want);
        }
#endif
        ++rows;
      }
    }
  }
  CHECK(rows > 300);
  if (!avx512) WARN("this CPU lacks AVX-512: only the portable half top-k kernel ran");
}

TEST_CASE("product-key top-k equals brute force at knn 16, 32 and 64 over 512 keys",
          "[product_keys]") {
  // The layer's shapes: the avx512 half kernel and the grid merge together.
  std::mt19937_64 rng(19);
  std::normal_distribution<float> g;
  pkm::ProductKeyScratch<float> scratch;
  for (Index k : {16, 32, 64}) {
    for (int rep = 0; rep < 6; ++rep) {
      const Index n = 512;
      std::vector<float> a(n), b(n);
      for (Index i = 0; i < n; ++i) {
        a[i] = g(rng);
        b[i] = rep % 2 ? std::round(g(rng) * 4.0f) / 4.0f : g(rng) * 10.0f;
      }
      expect_equal_to_brute_force(a, b, n, k, scratch);
    }
  }
}
