// pkm/detail/quantized_kernels.hpp — the inner loop of the read over quantized rows for one
// token:  out[0, dim) = sum_l w[l] (scale_l q_l + bias_l) = sum_l (w[l] scale_l) q_l + sum_l w[l] bias_l
// with the row's scale applied once per row (c_l = w[l] scale_l), never per element, and the
// bias term added once per token. Each column's sum is the same chain of fused multiply-adds
// c_l q_l in bag order in every kernel, then + sum_l w[l] bias_l, so the three kernels give the
// same bits:
//   avx512    16 codes widened a step, 256 columns held in sixteen registers across the bag,
//   avx2      8 codes a step, 64 columns in eight registers,
//   portable  plain C++ (std::fma), for any CPU and as the reference,
// each prefetching whole rows ahead while it sums the first column block. The SIMD kernels are compiled with
// target attributes and chosen at run time (one binary runs on any x86-64).
//
// Widening: int8 bytes zero-extend to int32 then convert; int4 nibbles are first spread to
// bytes (low nibble first); an fp8 e4m3 byte's exponent and mantissa bits become an fp16's
// (F16C converts them), which is the fp8 value times 2^-8: the row's coefficient carries the
// 256 (exact: a power of two).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PKM_QUANT_X86 1
#endif

#include "pkm/dtype.hpp"
#include "pkm/types.hpp"

namespace pkm::detail {

/// Where a row's scale (and bias) are, and how a code widens.
struct QuantRowFormat {
  Dtype format;
  Index dim;
  Index value_bytes;  ///< bytes of the codes; the scale follows them
};

inline QuantRowFormat quant_row_format(Dtype format, Index dim) {
  return {format, dim, format == Dtype::int4_rowwise ? (dim + 1) / 2 : dim};
}

/// c = w scale (times 256 for fp8, see above) and the row's bias term w bias.
inline void quant_row_coefficients(const QuantRowFormat& f, const std::uint8_t* row, float w,
                                   float& c, float& wb) {
  const std::uint8_t* tail = row + f.value_bytes;
  float scale, bias = 0.0f;
  if (f.format == Dtype::int4_rowwise) {
    std::uint16_t s, b;
    std::memcpy(&s, tail, 2);
    std::memcpy(&b, tail + 2, 2);
    scale = static_cast<float>(Eigen::numext::bit_cast<fp16>(s));
    bias = static_cast<float>(Eigen::numext::bit_cast<fp16>(b));
  } else {
    std::memcpy(&scale, tail, 4);
    if (f.format == Dtype::int8_rowwise) std::memcpy(&bias, tail + 4, 4);
  }
  c = w * scale;
  if (f.format == Dtype::fp8_rowwise) c *= 256.0f;
  wb = w * bias;
}

/// Column d's code as the kernels widen it (fp8: 2^-8 times its value).
inline float quant_code_widened(Dtype format, const std::uint8_t* row, Index d) {
  switch (format) {
    case Dtype::int8_rowwise:
      return static_cast<float>(row[d]);
    case Dtype::int4_rowwise:
      return static_cast<float>((row[d / 2] >> (4 * (d % 2))) & 0xF);
    default: {
      const std::uint8_t c = row[d];
      const auto bits = static_cast<std::uint16_t>(((c & 0x80u) << 8) | ((c & 0x7Fu) << 7));
      return static_cast<float>(Eigen::numext::bit_cast<fp16>(bits));
    }
  }
}

/// The bias term of a token: sum_l w[l] bias_l, one fused multiply-add per row in bag order.
inline float quant_bias_term(const QuantRowFormat& f, const std::uint8_t* base, Index stride,
                             const std::int64_t* idx, const float* w, Index bag) {
  if (f.format == Dtype::fp8_rowwise) return 0.0f;
  float beta = 0.0f;
  for (Index l = 0; l < bag; ++l) {
    const std::uint8_t* tail = base + idx[l] * stride + f.value_bytes;
    float bias;
    if (f.format == Dtype::int4_rowwise) {
      std::uint16_t b;
      std::memcpy(&b, tail + 2, 2);
      bias = static_cast<float>(Eigen::numext::bit_cast<fp16>(b));
    } else {
      std::memcpy(&bias, tail + 4, 4);
    }
    beta = std::fma(w[l], bias, beta);
  }
  return beta;
}

/// Columns [d0, dim) the plain way: out[d] = (sum_l c_l q_l(d)) + beta, in the same order.
template <Dtype F>
void quant_bag_tail(const QuantRowFormat& f, const std::uint8_t* base, Index stride,
                    const std::int64_t* idx, const float* w, Index bag, Index d0, float beta,
                    float* out) {
  float fp8[256];  // the widened value of each fp8 code
  if constexpr (F == Dtype::fp8_rowwise) {
    for (int code = 0; code < 256; ++code) {
      const auto c = static_cast<std::uint8_t>(code);
      fp8[code] = quant_code_widened(F, &c, 0);
    }
  }
  for (Index d = d0; d < f.dim; ++d) out[d] = 0.0f;
  for (Index l = 0; l < bag; ++l) {
    const std::uint8_t* row = base + idx[l] * stride;
    float c, wb;
    quant_row_coefficients(f, row, w[l], c, wb);
    Index d = d0;
    if constexpr (F == Dtype::int4_rowwise) {  // d0 is even: a byte's two columns a step
      for (; d + 2 <= f.dim; d += 2) {
        const unsigned byte = row[d / 2];
        out[d] = std::fma(c, static_cast<float>(byte & 0xF), out[d]);
        out[d + 1] = std::fma(c, static_cast<float>(byte >> 4), out[d + 1]);
      }
    }
    for (; d < f.dim; ++d) {
      float q;
      if constexpr (F == Dtype::int8_rowwise) {
        q = static_cast<float>(row[d]);
      } else if constexpr (F == Dtype::int4_rowwise) {
        q = static_cast<float>((row[d / 2] >> (4 * (d % 2))) & 0xF);
      } else {
        q = fp8[row[d]];
      }
      out[d] = std::fma(c, q, out[d]);
    }
  }
  if constexpr (F != Dtype::fp8_rowwise) {
    for (Index d = d0; d < f.dim; ++d) out[d] += beta;
  }
}

/// The portable kernel: the whole row the plain way.
inline void quant_bag_portable(const QuantRowFormat& f, const std::uint8_t* base, Index stride,
                               const std::int64_t* idx, const float* w, Index bag, float* out) {
  const float beta = quant_bias_term(f, base, stride, idx, w, bag);
  switch (f.format) {
    case Dtype::int8_rowwise:
      quant_bag_tail<Dtype::int8_rowwise>(f, base, stride, idx, w, bag, 0, beta, out);
      return;
    case Dtype::int4_rowwise:
      quant_bag_tail<Dtype::int4_rowwise>(f, base, stride, idx, w, bag, 0, beta, out);
      return;
    default:
      quant_bag_tail<Dtype::fp8_rowwise>(f, base, stride, idx, w, bag, 0, beta, out);
      return;
  }
}

/// How far ahead the SIMD kernels prefetch, in bytes of whole rows: while they sum the first
/// column block they prefetch row l + ahead whole (codes, scale, bias), ahead = this / the
/// row's bytes (2 to 16 rows), so the first block streams whole rows from memory and the
/// later blocks find them in L2 (a bag of 128 rows of up to 4 KiB stays there).
inline constexpr Index kQuantPrefetchBytes = 4096;

inline Index quant_prefetch_rows(const QuantRowFormat& f) {
  const Index row = f.value_bytes + (f.format == Dtype::int8_rowwise ? 8 : 4);
  return std::max<Index>(2, std::min<Index>(16, kQuantPrefetchBytes / row));
}

#ifdef PKM_QUANT_X86
/// Prefetches the row's bytes [0, bytes) into L2.
inline void quant_prefetch(const std::uint8_t* p, Index bytes) {
  for (Index off = 0; off < bytes; off += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p + off), _MM_HINT_T1);
  _mm_prefetch(reinterpret_cast<const char*>(p + bytes - 1), _MM_HINT_T1);
}

#define PKM_QUANT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define PKM_QUANT_AVX2 __attribute__((target("avx2,fma,f16c")))

/// The bytes of column d's code (d even for int4).
template <Dtype F>
constexpr Index quant_code_offset(Index d) {
  return F == Dtype::int4_rowwise ? d / 2 : d;
}

/// The 16 codes at p (the bytes of columns [d, d + 16), d a multiple of 16) widened to float.
template <Dtype F>
PKM_QUANT_AVX512 inline __m512 quant_load16(const std::uint8_t* p) {
  if constexpr (F == Dtype::int8_rowwise) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  } else if constexpr (F == Dtype::int4_rowwise) {
    const __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m128i bytes = _mm_or_si128(_mm_and_si128(w, _mm_set1_epi16(0x0F)),
                                       _mm_slli_epi16(_mm_srli_epi16(w, 4), 8));
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
  } else {
    const __m256i h = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_cvtph_ps(_mm256_and_si256(_mm256_slli_epi16(h, 7),
                                            _mm256_set1_epi16(static_cast<short>(0xBF80))));
  }
}

template <Dtype F>
PKM_QUANT_AVX512 void quant_bag_avx512(const QuantRowFormat& f, const std::uint8_t* base,
                                       Index stride, const std::int64_t* idx, const float* w,
                                       Index bag, float* out,
                                       const std::int64_t* next_idx, bool prefetched) {
  const Index ahead = quant_prefetch_rows(f);
  const Index row_bytes = f.value_bytes + (F == Dtype::int8_rowwise ? 8 : 4);
  const Index dim = f.dim;
  const float beta = quant_bias_term(f, base, stride, idx, w, bag);
  const __m512 vbeta = _mm512_set1_ps(beta);
  const bool add_beta = F != Dtype::fp8_rowwise;
  Index d0 = 0;
  // The next token's rows are prefetched while this token's are summed, one every `blocks`
  // iterations over all the column blocks (its rows then wait in L2); the first token of a
  // thread's run prefetches its own rows `ahead` rows ahead in the first block instead.
  const Index blocks = std::max<Index>(1, dim / 256);
  Index step = 0;
  for (; d0 + 256 <= dim; d0 += 256) {
    __m512 acc[16];
    for (auto& a : acc) a = _mm512_setzero_ps();
    for (Index l = 0; l < bag; ++l) {
      if (!prefetched && d0 == 0 && l + ahead < bag)
        quant_prefetch(base + idx[l + ahead] * stride, row_bytes);
      if (next_idx != nullptr && step % blocks == 0) quant_prefetch(base + next_idx[step / blocks] * stride, row_bytes);
      ++step;
      const std::uint8_t* row = base + idx[l] * stride;
      float c, wb;
      quant_row_coefficients(f, row, w[l], c, wb);
      const __m512 x = _mm512_set1_ps(c);
      const std::uint8_t* p = row + quant_code_offset<F>(d0);
      if constexpr (F == Dtype::int4_rowwise) {
        // 32 columns per 16 bytes: the low nibbles (even columns) in acc[2j], the high ones
        // (odd columns) in acc[2j + 1], interleaved when stored.
        for (int j = 0; j < 8; ++j) {
          const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * j)));
          const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(0x0F)));
          const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
          acc[2 * j] = _mm512_fmadd_ps(x, lo, acc[2 * j]);
          acc[2 * j + 1] = _mm512_fmadd_ps(x, hi, acc[2 * j + 1]);
        }
      } else {
        for (int j = 0; j < 16; ++j)
          acc[j] = _mm512_fmadd_ps(x, quant_load16<F>(p + 16 * j), acc[j]);
      }
    }
    if constexpr (F == Dtype::int4_rowwise) {
      const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
      const __m512i second =
          _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
      for (int j = 0; j < 8; ++j) {
        const __m512 a = _mm512_permutex2var_ps(acc[2 * j], first, acc[2 * j + 1]);
        const __m512 b = _mm512_permutex2var_ps(acc[2 * j], second, acc[2 * j + 1]);
        _mm512_storeu_ps(out + d0 + 32 * j, _mm512_add_ps(a, vbeta));
        _mm512_storeu_ps(out + d0 + 32 * j + 16, _mm512_add_ps(b, vbeta));
      }
    } else {
      for (int j = 0; j < 16; ++j)
        _mm512_storeu_ps(out + d0 + 16 * j, add_beta ? _mm512_add_ps(acc[j], vbeta) : acc[j]);
    }
  }
  for (; d0 + 16 <= dim; d0 += 16) {
    __m512 acc = _mm512_setzero_ps();
    for (Index l = 0; l < bag; ++l) {
      const std::uint8_t* row = base + idx[l] * stride;
      float c, wb;
      quant_row_coefficients(f, row, w[l], c, wb);
      acc = _mm512_fmadd_ps(_mm512_set1_ps(c), quant_load16<F>(row + quant_code_offset<F>(d0)), acc);
    }
    _mm512_storeu_ps(out + d0, add_beta ? _mm512_add_ps(acc, vbeta) : acc);
  }
  if (d0 < dim) quant_bag_tail<F>(f, base, stride, idx, w, bag, d0, beta, out);
}

/// The 8 codes at p (the bytes of columns [d, d + 8), d a multiple of 8) widened to float.
template <Dtype F>
PKM_QUANT_AVX2 inline __m256 quant_load8(const std::uint8_t* p) {
  if constexpr (F == Dtype::int8_rowwise) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  } else if constexpr (F == Dtype::int4_rowwise) {
    std::int32_t four;
    std::memcpy(&four, p, 4);
    const __m128i w = _mm_cvtepu8_epi16(_mm_cvtsi32_si128(four));
    const __m128i bytes = _mm_or_si128(_mm_and_si128(w, _mm_set1_epi16(0x0F)),
                                       _mm_slli_epi16(_mm_srli_epi16(w, 4), 8));
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
  } else {
    const __m128i h = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm256_cvtph_ps(
        _mm_and_si128(_mm_slli_epi16(h, 7), _mm_set1_epi16(static_cast<short>(0xBF80))));
  }
}

template <Dtype F>
PKM_QUANT_AVX2 void quant_bag_avx2(const QuantRowFormat& f, const std::uint8_t* base,
                                   Index stride, const std::int64_t* idx, const float* w,
                                   Index bag, float* out,
                                       const std::int64_t* next_idx, bool prefetched) {
  const Index ahead = quant_prefetch_rows(f);
  const Index row_bytes = f.value_bytes + (F == Dtype::int8_rowwise ? 8 : 4);
  const Index dim = f.dim;
  const float beta = quant_bias_term(f, base, stride, idx, w, bag);
  const __m256 vbeta = _mm256_set1_ps(beta);
  const bool add_beta = F != Dtype::fp8_rowwise;
  Index d0 = 0;
  // The next token's rows are prefetched while this token's are summed, one every `blocks`
  // iterations over all the column blocks (its rows then wait in L2); the first token of a
  // thread's run prefetches its own rows `ahead` rows ahead in the first block instead.
  const Index blocks = std::max<Index>(1, dim / 64);
  Index step = 0;
  for (; d0 + 64 <= dim; d0 += 64) {
    __m256 acc[8];
    for (auto& a : acc) a = _mm256_setzero_ps();
    for (Index l = 0; l < bag; ++l) {
      if (!prefetched && d0 == 0 && l + ahead < bag)
        quant_prefetch(base + idx[l + ahead] * stride, row_bytes);
      if (next_idx != nullptr && step % blocks == 0) quant_prefetch(base + next_idx[step / blocks] * stride, row_bytes);
      ++step;
      const std::uint8_t* row = base + idx[l] * stride;
      float c, wb;
      quant_row_coefficients(f, row, w[l], c, wb);
      const __m256 x = _mm256_set1_ps(c);
      const std::uint8_t* p = row + quant_code_offset<F>(d0);
      if constexpr (F == Dtype::int4_rowwise) {
        // 16 columns per 8 bytes: even columns (low nibbles) in acc[2j], odd in acc[2j + 1].
        for (int j = 0; j < 4; ++j) {
          const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * j)));
          const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(0x0F)));
          const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4));
          acc[2 * j] = _mm256_fmadd_ps(x, lo, acc[2 * j]);
          acc[2 * j + 1] = _mm256_fmadd_ps(x, hi, acc[2 * j + 1]);
        }
      } else {
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(x, quant_load8<F>(p + 8 * j), acc[j]);
      }
    }
    if constexpr (F == Dtype::int4_rowwise) {
      for (int j = 0; j < 4; ++j) {
        const __m256 lo = _mm256_unpacklo_ps(acc[2 * j], acc[2 * j + 1]);
        const __m256 hi = _mm256_unpackhi_ps(acc[2 * j], acc[2 * j + 1]);
        _mm256_storeu_ps(out + d0 + 16 * j, _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), vbeta));
        _mm256_storeu_ps(out + d0 + 16 * j + 8, _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x31), vbeta));
      }
    } else {
      for (int j = 0; j < 8; ++j)
        _mm256_storeu_ps(out + d0 + 8 * j, add_beta ? _mm256_add_ps(acc[j], vbeta) : acc[j]);
    }
  }
  for (; d0 + 8 <= dim; d0 += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (Index l = 0; l < bag; ++l) {
      const std::uint8_t* row = base + idx[l] * stride;
      float c, wb;
      quant_row_coefficients(f, row, w[l], c, wb);
      acc = _mm256_fmadd_ps(_mm256_set1_ps(c), quant_load8<F>(row + quant_code_offset<F>(d0)), acc);
    }
    _mm256_storeu_ps(out + d0, add_beta ? _mm256_add_ps(acc, vbeta) : acc);
  }
  if (d0 < dim) quant_bag_tail<F>(f, base, stride, idx, w, bag, d0, beta, out);
}

#undef PKM_QUANT_AVX512
#undef PKM_QUANT_AVX2

inline bool cpu_has_quant_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}
// Every CPU with AVX2 and FMA has F16C (Haswell, Zen and later).
inline bool cpu_has_quant_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
inline bool cpu_has_quant_avx512() { return false; }
inline bool cpu_has_quant_avx2() { return false; }
#endif

}  // namespace pkm::detail
