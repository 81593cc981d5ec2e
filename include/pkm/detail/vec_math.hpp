// pkm/detail/vec_math.hpp — element-wise math that vectorises under any compiler flags and
// gives every element the same bits wherever it sits in an array.
//
// A loop calling std::sqrt does not vectorise unless errno is off (-fno-math-errno), and
// Eigen's packet sqrt for float is an approximation (reciprocal square root and a Newton step
// under EIGEN_FAST_MATH) whose bits differ from the scalar tail's. The hardware's packed square
// root is correctly rounded like the scalar one, so sqrt_array uses it directly.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX__) || defined(__SSE2__)
#include <immintrin.h>
#endif

namespace pkm::detail {

/// out[i] = sqrt(in[i]), correctly rounded (the same bits as std::sqrt), for i < n.
/// `out` may equal `in`.
template <class S>
void sqrt_array(const S* in, S* out, std::int64_t n) {
  std::int64_t i = 0;
  if constexpr (std::is_same_v<S, float>) {
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, _mm512_sqrt_ps(_mm512_loadu_ps(in + i)));
#endif
#if defined(__AVX__)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_sqrt_ps(_mm256_loadu_ps(in + i)));
#endif
#if defined(__SSE2__)
    for (; i + 4 <= n; i += 4) _mm_storeu_ps(out + i, _mm_sqrt_ps(_mm_loadu_ps(in + i)));
#endif
  } else if constexpr (std::is_same_v<S, double>) {
#if defined(__AVX512F__)
    for (; i + 8 <= n; i += 8) _mm512_storeu_pd(out + i, _mm512_sqrt_pd(_mm512_loadu_pd(in + i)));
#endif
#if defined(__AVX__)
    for (; i + 4 <= n; i += 4) _mm256_storeu_pd(out + i, _mm256_sqrt_pd(_mm256_loadu_pd(in + i)));
#endif
#if defined(__SSE2__)
    for (; i + 2 <= n; i += 2) _mm_storeu_pd(out + i, _mm_sqrt_pd(_mm_loadu_pd(in + i)));
#endif
  }
  for (; i < n; ++i) out[i] = std::sqrt(in[i]);
}

/// True when none of x[0..n) is NaN or an infinity. Tests the exponent bits as integers (all
/// ones means NaN or infinity), a loop that vectorises under any flags, unlike a floating-point
/// test, and reads memory at close to streaming speed.
template <class S>
bool all_finite(const S* x, std::int64_t n) {
  static_assert(std::is_same_v<S, float> || std::is_same_v<S, double>,
                "all_finite: float or double");
  using Bits = std::conditional_t<std::is_same_v<S, float>, std::uint32_t, std::uint64_t>;
  constexpr Bits kExp = std::is_same_v<S, float> ? Bits(0x7f800000u) : Bits(0x7ff0000000000000ull);
  constexpr std::int64_t kChunk = 1024;  // early exit between chunks
  for (std::int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const std::int64_t len = n - i0 < kChunk ? n - i0 : kChunk;
    Bits bad = 0;
    for (std::int64_t i = 0; i < len; ++i) {
      Bits u;
      std::memcpy(&u, x + i0 + i, sizeof u);
      bad |= static_cast<Bits>((u & kExp) == kExp);
    }
    if (bad) return false;
  }
  return true;
}

}  // namespace pkm::detail
