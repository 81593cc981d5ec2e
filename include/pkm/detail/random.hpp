// pkm/detail/random.hpp — counter-based random numbers: the same seed gives the same values
// on every compiler, standard library and thread count (std:: distributions do not).
#pragma once

#include <cmath>
#include <cstdint>

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

}  // namespace pkm::detail
