// pkm/detail/bag_kernels.hpp — the inner loops of the embedding bag for one token:
//   out[0, dim) = sum_l w[l] * row(l)[0, dim)      and      dot(g, row) for the backward,
// with rows of float, bf16 or fp16 and float accumulation.
//
// With AVX2 + FMA (chosen at compile time: build with -mavx2 -mfma or -march=native) the sum keeps
// 64 output floats in eight registers across the whole bag, so each value row is read once and the
// accumulators never go to memory, and prefetches the same 64-element block of the row
// kPrefetchBytes of blocks ahead (8 rows of fp32, 16 of bf16/fp16). With AVX-512 as well, blocks of
// 256 floats in sixteen registers go first (1 KiB runs of an fp32 row, which the hardware
// prefetchers follow far better than 256-byte runs). bf16 rows widen by a shift, fp16 rows by F16C.
// Other builds use Eigen's vectorised expressions (whatever ISA Eigen targets). In every path the
// bag is summed in order, so the result does not depend on threads; in the AVX2 path every column
// (vector block or tail) is the same chain of fused multiply-adds, so a column's sum does not
// depend on where in the row it sits either (column shards read bit for bit what the whole table
// reads).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PKM_AVX2_BAG 1
#endif

#include "pkm/types.hpp"

namespace pkm::detail {

/// How far ahead the gather prefetches, in bytes of row blocks: the kernel is bound by the
/// cache lines in flight, so a 16-bit table looks twice as many rows ahead as a float one
/// (8 rows of 64 floats, 16 rows of 64 bf16).
inline constexpr Index kPrefetchBytes = 2048;
template <class T>
constexpr Index prefetch_rows() {
  return kPrefetchBytes / (64 * Index(sizeof(T)));
}

template <class T>
inline float to_float(T v) {
  return static_cast<float>(v);
}

#ifdef PKM_AVX2_BAG
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#ifdef __F16C__
inline __m256 load8(const fp16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif
/// The row types load8 widens: float and bf16, and fp16 where F16C is enabled.
template <class T>
struct has_load8 : std::bool_constant<std::is_same_v<T, float> || std::is_same_v<T, bf16>
#ifdef __F16C__
                                      || std::is_same_v<T, fp16>
#endif
                                      > {
};

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

template <class T>
inline void prefetch_block(const T* p, Index elems) {
  const char* c = reinterpret_cast<const char*>(p);
  const Index bytes = elems * Index(sizeof(T));
  for (Index off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T1);
  _mm_prefetch(c + bytes - 1, _MM_HINT_T1);
}
#endif

#if defined(PKM_AVX2_BAG) && defined(__AVX512F__)
#define PKM_AVX512_BAG 1
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const fp16* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

/// The AVX-512 form of the sum: 256 output floats in sixteen registers across the bag, so a
/// row is read in 1 KiB runs (fp32) that the hardware prefetchers follow, and the next rows'
/// same runs prefetched `ahead` rows in advance.
template <class T>
void bag_sum_avx512(const T* base, Index stride, const std::int64_t* idx, const float* w, Index bag,
                    Index dim, Index& d0, float* out) {
  constexpr Index ahead =
      4;  // 2 / 4 / 8 / 16 rows ahead measured 38 / 43 / 39 / 43 GB/s at v_dim 1024
  for (; d0 + 256 <= dim; d0 += 256) {
    __m512 acc[16];
    for (auto& a : acc) a = _mm512_setzero_ps();
    for (Index l = 0; l < bag; ++l) {
      if (l + ahead < bag) prefetch_block(base + idx[l + ahead] * stride + d0, 256);
      const T* r = base + idx[l] * stride + d0;
      const __m512 x = _mm512_set1_ps(w[l]);
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(x, load16(r + 16 * j), acc[j]);
    }
    for (int j = 0; j < 16; ++j) _mm512_storeu_ps(out + d0 + 16 * j, acc[j]);
  }
}
#endif

/// True where the fast kernel serves tables of T with float accumulation.
template <class T, class S>
constexpr bool fast_bag() {
#ifdef PKM_AVX2_BAG
  return std::is_same_v<S, float> && has_load8<T>::value;
#else
  return false;
#endif
}

/// out[0, dim) = sum over l < bag of w[l] * (base + idx[l] * stride)[0, dim).
template <class T, class S>
void bag_sum(const T* base, Index stride, const std::int64_t* idx, const S* w, Index bag, Index dim,
             S* out) {
#ifdef PKM_AVX2_BAG
  if constexpr (fast_bag<T, S>()) {
    constexpr Index ahead = prefetch_rows<T>();
    Index d0 = 0;
#ifdef PKM_AVX512_BAG
    bag_sum_avx512(base, stride, idx, w, bag, dim, d0, out);
#endif
    for (; d0 + 64 <= dim; d0 += 64) {
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0,
             a7 = a0;
      for (Index l = 0; l < bag; ++l) {
        if (l + ahead < bag) prefetch_block(base + idx[l + ahead] * stride + d0, 64);
        const T* r = base + idx[l] * stride + d0;
        const __m256 x = _mm256_set1_ps(w[l]);
        a0 = _mm256_fmadd_ps(x, load8(r), a0);
        a1 = _mm256_fmadd_ps(x, load8(r + 8), a1);
        a2 = _mm256_fmadd_ps(x, load8(r + 16), a2);
        a3 = _mm256_fmadd_ps(x, load8(r + 24), a3);
        a4 = _mm256_fmadd_ps(x, load8(r + 32), a4);
        a5 = _mm256_fmadd_ps(x, load8(r + 40), a5);
        a6 = _mm256_fmadd_ps(x, load8(r + 48), a6);
        a7 = _mm256_fmadd_ps(x, load8(r + 56), a7);
      }
      _mm256_storeu_ps(out + d0, a0);
      _mm256_storeu_ps(out + d0 + 8, a1);
      _mm256_storeu_ps(out + d0 + 16, a2);
      _mm256_storeu_ps(out + d0 + 24, a3);
      _mm256_storeu_ps(out + d0 + 32, a4);
      _mm256_storeu_ps(out + d0 + 40, a5);
      _mm256_storeu_ps(out + d0 + 48, a6);
      _mm256_storeu_ps(out + d0 + 56, a7);
    }
    for (; d0 + 8 <= dim; d0 += 8) {
      __m256 a = _mm256_setzero_ps();
      for (Index l = 0; l < bag; ++l)
        a = _mm256_fmadd_ps(_mm256_set1_ps(w[l]), load8(base + idx[l] * stride + d0), a);
      _mm256_storeu_ps(out + d0, a);
    }
    for (; d0 < dim; ++d0) {  // fused multiply-adds as in the vector blocks: a column's sum
      float a = 0;            // is the same wherever the column sits (pkm/distributed)
      for (Index l = 0; l < bag; ++l) a = std::fma(w[l], to_float(base[idx[l] * stride + d0]), a);
      out[d0] = a;
    }
    return;
  }
#endif
  Eigen::Map<Vector<S>> acc(out, dim);
  acc.setZero();
  for (Index l = 0; l < bag; ++l) {
    const Eigen::Map<const Vector<T>> row(base + idx[l] * stride, dim);
    if constexpr (std::is_same_v<T, S>) {
      acc.noalias() += w[l] * row;
    } else {
      acc.noalias() += w[l] * row.template cast<S>();
    }
  }
}

/// <g, row> over dim entries, with float (or S) accumulation.
template <class T, class S>
S row_dot(const S* g, const T* row, Index dim) {
#ifdef PKM_AVX2_BAG
  if constexpr (fast_bag<T, S>()) {
    __m256 a = _mm256_setzero_ps(), b = a;
    Index d = 0;
    for (; d + 16 <= dim; d += 16) {
      a = _mm256_fmadd_ps(_mm256_loadu_ps(g + d), load8(row + d), a);
      b = _mm256_fmadd_ps(_mm256_loadu_ps(g + d + 8), load8(row + d + 8), b);
    }
    float s = hsum(_mm256_add_ps(a, b));
    for (; d < dim; ++d) s += g[d] * to_float(row[d]);
    return s;
  }
#endif
  const Eigen::Map<const Vector<S>> gv(g, dim);
  const Eigen::Map<const Vector<T>> rv(row, dim);
  if constexpr (std::is_same_v<T, S>) {
    return gv.dot(rv);
  } else {
    return gv.dot(rv.template cast<S>());
  }
}

}  // namespace pkm::detail
