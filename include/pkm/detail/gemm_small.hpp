// pkm/detail/gemm_small.hpp — pkm::gemm's kernel for a few rows against a matrix stored by
// rows: C (m x n) = alpha A B^T + beta C with m small (a decoding model's batch of 1-64
// tokens). Every product of the layer's forward has this form (x W^T, q K^T).
//
// A library GEMM packs B (the weights: megabytes) on every call, which at m = 1-16 costs more
// than the product, and allocates its packing buffers. Here each element is one dot product
// of an A row and a B row, computed in a fixed order that depends only on k: 16 lanes, lane l
// accumulating the products at k = l, l + 16, ... (fused multiply-adds where the compiler
// contracts), then a fixed pairwise sum of the lanes. So an element's bits do not depend on
// m, on how the columns are split over threads, or on the thread count: a token gives the
// same result alone and in a batch of up to kSmallGemmRows. Four B rows at a time
// share each load of the A row; the columns are split over the threads in fixed blocks. No
// allocation.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "pkm/detail/parallel.hpp"

namespace pkm::detail {

/// The most rows of A pkm::gemm gives the small-batch kernel: up to 8 it beat Eigen's and
/// BLIS's packed products at the layer's shapes (2048 x 1024 weights, AMD Zen 5, 1 and 2
/// threads: 1.0-4x); from 16 rows the packed kernels are faster.
inline constexpr std::int64_t kSmallGemmRows = 8;

/// True for the products the small-batch kernel takes: op(A) = A with at most kSmallGemmRows
/// rows, op(B) = B^T (x W^T at a decoding batch).
constexpr bool small_batch_product(bool trans_a, bool trans_b, std::int64_t m) {
  return !trans_a && trans_b && m <= kSmallGemmRows;
}
/// Columns of C per parallel block.
inline constexpr std::int64_t kSmallGemmColBlock = 64;

template <class S>
inline S sum_lanes16(const S* v) {
  S t8[8], t4[4];
  for (int l = 0; l < 8; ++l) t8[l] = v[l] + v[l + 8];
  for (int l = 0; l < 4; ++l) t4[l] = t8[l] + t8[l + 4];
  return (t4[0] + t4[2]) + (t4[1] + t4[3]);
}

/// The dot products of Q A rows a[0..Q) with R B rows b[0..R) over k elements, each in the
/// fixed lane order described above; out[q * R + r] = the dot of a[q] with b[r]. Blocking Q x
/// R shares each load among several products; it does not change any product's order.
template <int Q, int R, class S>
inline void dots_fixed_order(const S* const* a, const S* const* b, std::int64_t k, S* out) {
  constexpr int L = 16;
  S acc[Q][R][L] = {};
  const std::int64_t full = k / L * L;
  for (std::int64_t p = 0; p < full; p += L) {
    for (int q = 0; q < Q; ++q) {
      for (int r = 0; r < R; ++r) {
#pragma omp simd
        for (int l = 0; l < L; ++l) acc[q][r][l] += a[q][p + l] * b[r][p + l];
      }
    }
  }
  for (std::int64_t p = full; p < k; ++p) {
    for (int q = 0; q < Q; ++q)
      for (int r = 0; r < R; ++r) acc[q][r][p - full] += a[q][p] * b[r][p];
  }
  for (int q = 0; q < Q; ++q)
    for (int r = 0; r < R; ++r) out[q * R + r] = sum_lanes16(acc[q][r]);
}

/// Columns [j0, j1) of C = alpha A B^T + beta C, serially: the body of gemm_small_nt's blocks
/// (the key search of a decoding batch calls it for every head's columns in one region).
/// Every element is its fixed-order dot product, whichever columns a call takes.
template <class S>
void gemm_small_nt_cols(std::int64_t m, std::int64_t j0, std::int64_t j1, std::int64_t k, S alpha,
                        const S* a, std::int64_t lda, const S* b, std::int64_t ldb, S beta, S* c,
                        std::int64_t ldc) {
  auto store = [&](std::int64_t i, std::int64_t j, S dot) {
    S& y = c[i * ldc + j];
    y = beta == S(0) ? alpha * dot : alpha * dot + beta * y;
  };
  // Blocks of four columns (each load of an A row serves four products), then the columns
  // left over one at a time: every element is the same dot product whichever block computes
  // it. (Blocking two or four A rows as well measured no faster on AVX-512.)
  std::int64_t j = j0;
  for (; j + 4 <= j1; j += 4) {
    const S* bp[4] = {b + j * ldb, b + (j + 1) * ldb, b + (j + 2) * ldb, b + (j + 3) * ldb};
    for (std::int64_t i = 0; i < m; ++i) {
      const S* ap[1] = {a + i * lda};
      S d[4];
      dots_fixed_order<1, 4>(ap, bp, k, d);
      for (int r = 0; r < 4; ++r) store(i, j + r, d[r]);
    }
  }
  for (; j < j1; ++j) {
    const S* bp[1] = {b + j * ldb};
    for (std::int64_t i = 0; i < m; ++i) {
      const S* ap[1] = {a + i * lda};
      S d[1];
      dots_fixed_order<1, 1>(ap, bp, k, d);
      store(i, j, d[0]);
    }
  }
}

/// C = alpha A B^T + beta C for A m x k (lda), B n x k (ldb), C m x n (ldc); beta == 0: C is
/// not read. m <= kSmallGemmRows (the caller's choice; any m works). The columns are split
/// over the threads in fixed blocks.
template <class S>
void gemm_small_nt(std::int64_t m, std::int64_t n, std::int64_t k, S alpha, const S* a,
                   std::int64_t lda, const S* b, std::int64_t ldb, S beta, S* c, std::int64_t ldc) {
  parallel_blocks(n, kSmallGemmColBlock, [&](std::int64_t j0, std::int64_t j1) {
    gemm_small_nt_cols(m, j0, j1, k, alpha, a, lda, b, ldb, beta, c, ldc);
  });
}

}  // namespace pkm::detail
