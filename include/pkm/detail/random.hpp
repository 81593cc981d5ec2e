// pkm/detail/random.hpp — counter-based random numbers: the same seed gives the same values
// on every compiler, standard library and thread count (std:: distributions do not).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "pkm/detail/vec_math.hpp"

namespace pkm::detail {

/// SplitMix64 finaliser: a bijective mix of 64 bits.
inline std::uint64_t mix64(std::uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// A stream of values keyed by (seed, stream); value i depends on nothing else.
struct CounterRng {
  std::uint64_t key;
  CounterRng(std::uint64_t seed, std::uint64_t stream) : key(mix64(seed ^ mix64(stream + 1))) {}

  std::uint64_t bits(std::uint64_t i) const { return mix64(key ^ mix64(i)); }
  /// Uniform in (0, 1): 53 random bits, never 0.
  double uniform01(std::uint64_t i) const {
    return (static_cast<double>(bits(i) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
  }
  /// Uniform in (lo, hi).
  double uniform(std::uint64_t i, double lo, double hi) const {
    return lo + (hi - lo) * uniform01(i);
  }
  /// Standard normals i and i ^ 1, the two outputs of one Box-Muller transform of the
  /// draws (i & ~1, i | 1): (first, second) = (value i & ~1, value i | 1).
  void normal_pair(std::uint64_t i, double& first, double& second) const {
    const double r = std::sqrt(-2.0 * std::log(uniform01(i & ~std::uint64_t{1})));
    const double a = 6.283185307179586 * uniform01(i | 1);
    first = r * std::cos(a);
    second = r * std::sin(a);
  }
  /// Standard normal number i.
  double normal(std::uint64_t i) const {
    double first, second;
    normal_pair(i, first, second);
    return (i & 1) ? second : first;
  }
};

/// ln(x) for x in (0, 1], in float: exponent and mantissa split, then the Cephes logf
/// polynomial on [sqrt(1/2), sqrt(2)). No library call, so loops over it vectorise.
inline float fast_logf(float x) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, 4);
  float e = static_cast<float>(static_cast<int>((bits >> 23) & 0xffu) - 127);
  const std::uint32_t mbits = (bits & 0x7fffffu) | 0x3f800000u;
  float m;
  std::memcpy(&m, &mbits, 4);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1.0f : e;
  const float f = m - 1.0f, z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return f + y + 0.693359375f * e;
}

/// The random bits of normal pair p of a stream: SplitMix64 at counter p (one mix per pair).
inline std::uint64_t pair_bits(std::uint64_t key, std::uint64_t p) {
  return mix64(key + p * 0x9E3779B97F4A7C15ull);
}

/// Pairs of standard normals by Box-Muller in float, from pair_bits: the radius from the top
/// 24 bits, the angle from the low 24 (its quadrant exactly from 2 bits, sin / cos of the rest
/// by series on [0, pi/2)). Radius at most ~5.9 (the smallest uniform is 2^-25). Written as
/// two plain loops over a block that the compiler vectorises around one packed square root
/// (detail::sqrt_array): every pair goes through the same instructions.
struct NormalBlock {
  static constexpr int kPairs = 256;
  alignas(64) float t[kPairs];  ///< -2 ln u1, then the radius
  alignas(64) float x[kPairs];  ///< angle within its quadrant, radians
  alignas(64) std::uint32_t q[kPairs];

  /// Pairs p0 .. p0 + m - 1 (m <= kPairs) of stream `key`, written as out[2j], out[2j + 1].
  template <class T>
  void fill(std::uint64_t key, std::uint64_t p0, int m, float std_dev, T* out) {
    for (int j = 0; j < m; ++j) {
      const std::uint64_t h = pair_bits(key, p0 + static_cast<std::uint64_t>(j));
      const float u1 =
          (static_cast<float>(static_cast<std::uint32_t>(h >> 40)) + 0.5f) * (1.0f / 16777216.0f);
      const std::uint32_t a = static_cast<std::uint32_t>(h) & 0xffffffu;  // angle in 2^-24 turns
      q[j] = a >> 22;
      x[j] = static_cast<float>(static_cast<std::int32_t>(a & 0x3fffffu)) *
             (1.5707963267948966f / 4194304.0f);
      t[j] = -2.0f * fast_logf(u1);
    }
    sqrt_array(t, t, m);
    for (int j = 0; j < m; ++j) {
      const float xj = x[j], x2 = xj * xj, r = t[j] * std_dev;
      const float sn =
          xj * (1.0f +
                x2 * (-1.6666667e-1f +
                      x2 * (8.3333333e-3f +
                            x2 * (-1.9841270e-4f + x2 * (2.7557319e-6f + x2 * (-2.5052108e-8f))))));
      const float cs =
          1.0f +
          x2 * (-0.5f +
                x2 * (4.1666668e-2f +
                      x2 * (-1.3888889e-3f +
                            x2 * (2.4801587e-5f + x2 * (-2.7557319e-7f + x2 * 2.0876757e-9f)))));
      const std::uint32_t qj = q[j];  // (cos, sin) of q pi/2 + x
      const float c = qj == 0 ? cs : qj == 1 ? -sn : qj == 2 ? -cs : sn;
      const float s = qj == 0 ? sn : qj == 1 ? cs : qj == 2 ? -sn : -cs;
      out[2 * j] = static_cast<T>(r * c);
      out[2 * j + 1] = static_cast<T>(r * s);
    }
  }
};

/// out[j] = std_dev * normal number (first + j) of the stream `rng`, j in [0, n): numbers
/// 2p and 2p + 1 are pair p. Element j depends only on (rng, first + j), so any split of a
/// table over threads gives the same values.
template <class T>
void fill_normal(const CounterRng& rng, std::uint64_t first, std::int64_t n, float std_dev,
                 T* out) {
  if (n <= 0) return;
  NormalBlock blk;
  T edge[2];
  std::int64_t j = 0;
  if (first & 1) {  // the second half of a pair
    blk.fill(rng.key, first >> 1, 1, std_dev, edge);
    out[j++] = edge[1];
  }
  std::int64_t pairs = (n - j) / 2;
  std::uint64_t p = (first + static_cast<std::uint64_t>(j)) >> 1;
  while (pairs > 0) {
    const int m = static_cast<int>(pairs < NormalBlock::kPairs ? pairs : NormalBlock::kPairs);
    blk.fill(rng.key, p, m, std_dev, out + j);
    p += static_cast<std::uint64_t>(m);
    j += 2 * m;
    pairs -= m;
  }
  if (j < n) {  // the first half of a last pair
    blk.fill(rng.key, (first + static_cast<std::uint64_t>(j)) >> 1, 1, std_dev, edge);
    out[j] = edge[0];
  }
}

}  // namespace pkm::detail
