// pkm/detail/gemm_bf16_kernels.hpp — the pieces of pkm::gemm_bf16 (pkm/gemm_bf16.hpp):
// rounding to bf16, packing operands into bf16 pair panels, and the micro-kernels that
// multiply one MR x K panel of A by one K x NR panel of B with fp32 accumulation.
//
// Packed layout (the one AVX512-BF16's vdpbf16ps reads): a panel of R rows (A) or R columns
// (B) holds, for each pair of k indices (2t, 2t + 1), R pairs of bf16 values:
//   panel[(t * R + r) * 2 + e] = bf16(element (r, 2t + e)),  zero past the matrix's edge.
// Rounding is round-to-nearest-even with NaN kept NaN, done by plain integer code so that
// every machine packs the same bits.
//
// Two micro-kernels with the same arithmetic: each fp32 accumulator lane takes, for t = 0,
// 1, ..., the odd product then the even one (acc += a1 b1; acc += a0 b0, each product of two
// bf16 values exact in fp32, each sum rounded to nearest): the order Intel specifies for
// vdpbf16ps. `avx512_bf16` runs vdpbf16ps (runtime-detected; compiled for it with a target
// attribute, so one binary runs everywhere); `portable` is plain C++ the compiler
// vectorises for whatever ISA the build targets. (The hardware also treats subnormal bf16
// inputs as zero; the portable kernel does not.)
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define PKM_X86_BF16_KERNEL 1
#endif

namespace pkm::detail {

/// The bits of bf16(x): round to nearest even; NaN stays a (quiet) NaN — the bits of
/// pkm::bf16(x) (Eigen's rounding; test_gemm_bf16.cpp compares them), written branch-free so
/// the packing loops over it vectorise.
inline std::uint16_t bf16_bits(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const std::uint32_t nan = (u >> 16) | 0x40u;
  return static_cast<std::uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

/// The float a bf16 bit pattern stands for (exact).
inline float bf16_float(std::uint16_t h) {
  const std::uint32_t u = std::uint32_t{h} << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

/// x rounded to the nearest bf16 value, as a float.
inline float round_bf16(float x) { return bf16_float(bf16_bits(x)); }

/// Micro-tile of C: kBf16MR rows by kBf16NR columns (four 16-lane vectors per row).
inline constexpr int kBf16MR = 6;
inline constexpr int kBf16NR = 64;

/// Packs rows [0, valid) of an R-row panel whose rows are contiguous along k: element (r, p)
/// = src[r * s_row + p], p < k, into `dst` (pairs(k) * R * 2 values, layout above); rows past
/// `valid` and the odd k's last pair half are zero. A run of a row is converted in one
/// vectorised loop, then its pairs are stored 32 bits at a time, R pairs apart.
template <int R>
void pack_bf16_panel(const float* src, std::int64_t s_row, std::int64_t valid, std::int64_t k,
                     std::uint16_t* dst) {
  constexpr std::int64_t kRun = 256;  // elements converted at a time (even)
  const std::int64_t pairs = (k + 1) / 2;
  if (valid < R)
    std::memset(dst, 0, static_cast<std::size_t>(pairs) * R * 2 * sizeof(std::uint16_t));
  alignas(64) std::uint16_t run[kRun];
  for (std::int64_t r = 0; r < valid; ++r) {
    const float* row = src + r * s_row;
    for (std::int64_t p0 = 0; p0 < k; p0 += kRun) {
      const std::int64_t len = std::min(kRun, k - p0);
      for (std::int64_t p = 0; p < len; ++p) run[p] = bf16_bits(row[p0 + p]);
      if (len % 2 != 0) run[len] = 0;
      for (std::int64_t t = 0; t < (len + 1) / 2; ++t)
        std::memcpy(dst + ((p0 / 2 + t) * R + r) * 2, run + 2 * t, 4);
    }
  }
}

/// Packs pairs [t0, t1) of every R-row panel of a matrix stored the other way: element
/// (r, p) = src[r + p * s_k] for r < rows, p < k. Panel q starts at dst + q * pairs(k) * R * 2.
/// `pair_row` is scratch for panels * R values. Each k index's row is converted in one
/// vectorised loop; each panel then takes R pairs (R * 4 bytes) of it.
template <int R>
void pack_bf16_pairs(const float* src, std::int64_t s_k, std::int64_t rows, std::int64_t k,
                     std::int64_t t0, std::int64_t t1, std::uint32_t* pair_row,
                     std::uint16_t* dst) {
  const std::int64_t panels = (rows + R - 1) / R, size = (k + 1) / 2 * R * 2;
  for (std::int64_t r = rows; r < panels * R; ++r) pair_row[r] = 0;
  for (std::int64_t t = t0; t < t1; ++t) {
    const float* even = src + 2 * t * s_k;
    if (2 * t + 1 < k) {
      const float* odd = even + s_k;
      for (std::int64_t r = 0; r < rows; ++r)
        pair_row[r] = std::uint32_t{bf16_bits(even[r])} | std::uint32_t{bf16_bits(odd[r])} << 16;
    } else {
      for (std::int64_t r = 0; r < rows; ++r) pair_row[r] = bf16_bits(even[r]);
    }
    for (std::int64_t q = 0; q < panels; ++q)
      std::memcpy(dst + q * size + t * R * 2, pair_row + q * R, R * 4);
  }
}

/// acc (kBf16MR x kBf16NR, row-major) = A panel (pairs pairs) times B panel, plain C++.
inline void bf16_tile_portable(const std::uint16_t* a, const std::uint16_t* b, std::int64_t pairs,
                               float* acc) {
  constexpr int MR = kBf16MR, NR = kBf16NR;
  for (int i = 0; i < MR * NR; ++i) acc[i] = 0.0f;
  float b0[NR], b1[NR];
  for (std::int64_t t = 0; t < pairs; ++t) {
    const std::uint16_t* bt = b + t * NR * 2;
    for (int c = 0; c < NR; ++c) {
      b0[c] = bf16_float(bt[2 * c]);
      b1[c] = bf16_float(bt[2 * c + 1]);
    }
    const std::uint16_t* at = a + t * MR * 2;
    for (int r = 0; r < MR; ++r) {
      const float a0 = bf16_float(at[2 * r]), a1 = bf16_float(at[2 * r + 1]);
      float* row = acc + r * NR;
#pragma omp simd
      for (int c = 0; c < NR; ++c) {
        // Two separately rounded sums, odd product first (each product is exact).
        const float s = row[c] + a1 * b1[c];
        row[c] = s + a0 * b0[c];
      }
    }
  }
}

#ifdef PKM_X86_BF16_KERNEL
/// True where the CPU runs AVX512-BF16 (and the AVX-512 foundation it needs).
inline bool cpu_has_avx512_bf16() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

/// As bf16_tile_portable, with vdpbf16ps: 24 accumulators (6 rows x 4 vectors of 16).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void bf16_tile_avx512(
    const std::uint16_t* a, const std::uint16_t* b, std::int64_t pairs, float* acc) {
  __m512 c0[kBf16MR], c1[kBf16MR], c2[kBf16MR], c3[kBf16MR];
  for (int r = 0; r < kBf16MR; ++r) c0[r] = c1[r] = c2[r] = c3[r] = _mm512_setzero_ps();
  for (std::int64_t t = 0; t < pairs; ++t) {
    const std::uint16_t* bt = b + t * kBf16NR * 2;
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bt);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bt + 32);
    const __m512bh b2 = (__m512bh)_mm512_loadu_si512(bt + 64);
    const __m512bh b3 = (__m512bh)_mm512_loadu_si512(bt + 96);
    const std::uint16_t* at = a + t * kBf16MR * 2;
#pragma GCC unroll 6
    for (int r = 0; r < kBf16MR; ++r) {
      std::int32_t pair;
      std::memcpy(&pair, at + 2 * r, sizeof pair);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      c0[r] = _mm512_dpbf16_ps(c0[r], av, b0);
      c1[r] = _mm512_dpbf16_ps(c1[r], av, b1);
      c2[r] = _mm512_dpbf16_ps(c2[r], av, b2);
      c3[r] = _mm512_dpbf16_ps(c3[r], av, b3);
    }
  }
  for (int r = 0; r < kBf16MR; ++r) {
    _mm512_storeu_ps(acc + r * kBf16NR, c0[r]);
    _mm512_storeu_ps(acc + r * kBf16NR + 16, c1[r]);
    _mm512_storeu_ps(acc + r * kBf16NR + 32, c2[r]);
    _mm512_storeu_ps(acc + r * kBf16NR + 48, c3[r]);
  }
}
#else
inline bool cpu_has_avx512_bf16() { return false; }
#endif

}  // namespace pkm::detail
