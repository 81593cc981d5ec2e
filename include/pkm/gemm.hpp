// pkm/gemm.hpp — the one matrix product every pkm op goes through:
//
//   C (m x n) = alpha * op(A) * op(B) + beta * C,   all row-major with leading dimensions,
//
// computed by the backend CMake chose (PKM_BLAS=auto|blis|openblas|off, passed to the headers as
// PKM_WITH_BLIS / PKM_WITH_OPENBLAS by the pkm::pkm target):
//
//   eigen     Eigen's serial GEMM kernel over fixed tiles of C, the tiles spread over OpenMP
//             threads. Tile bounds depend only on (m, n), never on the thread count, and each
//             tile is one serial product whose blocking depends only on its shape: the same
//             bits with any number of threads. Always available.
//   blis      BLIS's typed API (arbitrary strides, no copies), threaded through a per-call
//             runtime object (no global state). BLIS threads only the m and n loops, never k:
//             the same bits with any number of threads.
//   openblas  cblas_?gemm. Fast, but OpenBLAS may split work differently for different thread
//             counts, so results can differ in the last bits between 1 and N threads: pkm's
//             same-bits promise does NOT hold with this backend (docs/benchmarks.md).
//
// On the eigen and blis backends, a product of at most 8 rows by a matrix stored by rows
// (op(A) = A, op(B) = B^T: every product of the layer's forward at a small batch) runs pkm's
// small-batch kernel (detail/gemm_small.hpp): no packing, no allocation, each element's bits
// independent of the batch (up to 8 rows) and of the threads.
//
// With BLIS compiled in, `auto` picks by CPU family where pkm_bench measured both (a table in
// gemm_backend()), else BLIS where it has a tuned kernel for the CPU (BLIS 0.9 falls back to
// its slow generic kernel on CPUs it does not know, e.g. AMD family 0x1A), else eigen;
// PKM_GEMM_BACKEND overrides. gemm_backend() says which one runs here.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

#include <Eigen/Core>

#include "pkm/detail/checked.hpp"
#include "pkm/detail/gemm_small.hpp"
#include "pkm/detail/parallel.hpp"

#if defined(PKM_WITH_BLIS)
#include <blis.h>
#endif
#if defined(PKM_WITH_OPENBLAS)
#include <cblas.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace pkm {

enum class GemmBackend { eigen, blis, openblas };

inline const char* gemm_backend_name(GemmBackend b) {
  switch (b) {
    case GemmBackend::eigen:
      return "eigen";
    case GemmBackend::blis:
      return "blis";
    case GemmBackend::openblas:
      return "openblas";
  }
  return "?";
}

/// True when `b` gives the same bits with any thread count.
constexpr bool gemm_backend_deterministic(GemmBackend b) { return b != GemmBackend::openblas; }

/// True when backend `b` was compiled in (eigen always is).
constexpr bool gemm_backend_available(GemmBackend b) {
  switch (b) {
    case GemmBackend::eigen:
      return true;
    case GemmBackend::blis:
#if defined(PKM_WITH_BLIS)
      return true;
#else
      return false;
#endif
    case GemmBackend::openblas:
#if defined(PKM_WITH_OPENBLAS)
      return true;
#else
      return false;
#endif
  }
  return false;
}

namespace detail {
/// The deterministic backend measured faster for pkm's products on this CPU's family, where
/// pkm_bench has measured it (BM_Gemm/pkm_eigen against BM_Gemm/pkm_blis, the layer's
/// largest product, 2 threads); otherwise none. A new measurement adds a row here.
///   AMD family 0x19 (Zen 3/4; EPYC family 25 model 17, 2026-12-07): blis 164-189 GFLOP/s,
///     eigen 147.
///   Intel with AVX-512 (2026-11, one run): BLIS's skx kernel ~200 GFLOP/s, Eigen's own
///     threaded product 274 (pkm's eigen tiles ran 1.05-1.16x that product where both were
///     measured). Intel family 6 model 207 (2026-12-07, two runs; BLIS picks its haswell
///     kernel there): pkm_blis 165 GFLOP/s, pkm_eigen 250.
///   AMD family 0x1A (Zen 5): BLIS 0.9 has no kernel for it (its generic one: ~60 against
///     eigen's ~230); the BLIS rule below already gives eigen.
inline bool measured_faster_backend(GemmBackend& out) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (__builtin_cpu_is("intel") && __builtin_cpu_supports("avx512f")) {
    out = GemmBackend::eigen;
    return true;
  }
  if (__builtin_cpu_is("amdfam19h")) {
    out = GemmBackend::blis;
    return true;
  }
#endif
  (void)out;
  return false;
}
}  // namespace detail

/// The backend pkm's ops use on this machine:
///  1. the environment variable PKM_GEMM_BACKEND (eigen, blis or openblas) where it is set;
///     a backend not compiled in, or another name, is refused (std::invalid_argument);
///  2. with OpenBLAS compiled in (PKM_BLAS=openblas), openblas;
///  3. with BLIS compiled in: the backend measured faster on this CPU family (above), where it
///     is compiled in and BLIS has a tuned kernel here; otherwise blis where BLIS has a tuned
///     kernel for the CPU (on a CPU it does not know, BLIS runs a portable C kernel several
///     times slower than Eigen's), else eigen;
///  4. eigen.
inline GemmBackend gemm_backend() {
  if (const char* env = std::getenv("PKM_GEMM_BACKEND")) {
    for (GemmBackend b : {GemmBackend::eigen, GemmBackend::blis, GemmBackend::openblas}) {
      if (std::strcmp(env, gemm_backend_name(b)) != 0) continue;
      if (!gemm_backend_available(b)) {
        throw std::invalid_argument(std::string("pkm: PKM_GEMM_BACKEND = ") + env +
                                    " was not compiled in (configure with PKM_BLAS=" + env + ")");
      }
      return b;
    }
    throw std::invalid_argument(std::string("pkm: PKM_GEMM_BACKEND = '") + env +
                                "' is not a backend; expected eigen, blis or openblas");
  }
#if defined(PKM_WITH_OPENBLAS)
  return GemmBackend::openblas;
#elif defined(PKM_WITH_BLIS)
  const bool blis_tuned = bli_arch_query_id() != BLIS_ARCH_GENERIC;
  GemmBackend measured = GemmBackend::eigen;
  if (detail::measured_faster_backend(measured))
    return measured == GemmBackend::blis && !blis_tuned ? GemmBackend::eigen : measured;
  return blis_tuned ? GemmBackend::blis : GemmBackend::eigen;
#else
  return GemmBackend::eigen;
#endif
}

namespace detail {

/// Tile of C computed by one serial Eigen product in the eigen backend: large enough that
/// packing is a small share of each tile, small enough to give every thread several tiles.
inline constexpr std::int64_t kGemmTileRows = 512;
inline constexpr std::int64_t kGemmTileCols = 256;

/// A stored matrix: `rows` rows of `cols` elements, `ld` elements apart, from `p`.
template <class S>
struct StoredMatrix {
  const S* p;
  std::int64_t rows, cols, ld;
  bool empty() const { return rows == 0 || cols == 0; }
  /// Elements from the first to one past the last (checked: at most 2^62 bytes).
  /// `name` is "A", "B" or "C" (the error message says which); no string is built unless
  /// the check fails.
  std::int64_t extent(const char* name) const {
    const char* what = name[0] == 'A'   ? "A's extent ((rows - 1) x ld + cols)"
                       : name[0] == 'B' ? "B's extent ((rows - 1) x ld + cols)"
                                        : "C's extent ((rows - 1) x ld + cols)";
    const std::int64_t span = checked_mul("pkm::gemm", what, rows - 1, ld, kMaxBytes / sizeof(S));
    return checked_add("pkm::gemm", what, span, cols, kMaxBytes / sizeof(S));
  }
};

/// True when stored matrices x and y (same element type, neither empty) share an element.
/// Exact where their leading dimensions are equal (interleaved column blocks of one buffer
/// do not overlap); where they differ, overlapping address ranges count as sharing.
template <class S>
bool share_elements(const StoredMatrix<S>& x, const StoredMatrix<S>& y) {
  const auto xa = reinterpret_cast<std::uintptr_t>(x.p), ya = reinterpret_cast<std::uintptr_t>(y.p);
  const auto xe = xa + static_cast<std::uintptr_t>(x.extent("A")) * sizeof(S);
  const auto ye = ya + static_cast<std::uintptr_t>(y.extent("B")) * sizeof(S);
  if (xe <= ya || ye <= xa) return false;  // disjoint address ranges
  if (x.ld != y.ld || (ya > xa ? ya - xa : xa - ya) % sizeof(S) != 0) return true;
  // Same ld: y's element (p, q) is x's element (p + r, q + s) where y.p - x.p = r ld + s.
  const std::int64_t ld = x.ld;
  const bool y_after = ya >= xa;
  const auto d = static_cast<std::int64_t>((y_after ? ya - xa : xa - ya) / sizeof(S));
  const StoredMatrix<S>& lo = y_after ? x : y;  // the one starting first
  const StoredMatrix<S>& hi = y_after ? y : x;
  const std::int64_t r = d / ld, s = d % ld;  // hi(p, q) = lo(p + r, q + s), 0 <= s < ld
  auto rows_meet = [&](std::int64_t shift) {  // some p < hi.rows with 0 <= p + shift < lo.rows
    return shift < lo.rows && hi.rows + shift > 0;
  };
  // hi column q lands on lo column q + s (same row offset r) or q + s - ld (row offset r + 1).
  const bool same_row = s < lo.cols && rows_meet(r);
  const bool next_row = hi.cols > ld - s && s > 0 && rows_meet(r + 1);
  return same_row || next_row;
}

template <class S>
void check_gemm_args(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
                     const S* a, std::int64_t lda, const S* b, std::int64_t ldb, const S* c,
                     std::int64_t ldc, bool reads_ab) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("pkm::gemm: " + what); };
  if (m < 0 || n < 0 || k < 0) {
    fail("sizes m = " + std::to_string(m) + ", n = " + std::to_string(n) +
         ", k = " + std::to_string(k) + "; expected non-negative sizes");
  }
  const std::int64_t a_cols = trans_a ? m : k, b_cols = trans_b ? k : n;
  if (lda < std::max<std::int64_t>(1, a_cols))
    fail("lda = " + std::to_string(lda) + " < " + std::to_string(a_cols));
  if (ldb < std::max<std::int64_t>(1, b_cols))
    fail("ldb = " + std::to_string(ldb) + " < " + std::to_string(b_cols));
  if (ldc < std::max<std::int64_t>(1, n))
    fail("ldc = " + std::to_string(ldc) + " < n = " + std::to_string(n));
  if ((m > 0 && n > 0 && c == nullptr) ||
      (m > 0 && n > 0 && k > 0 && (a == nullptr || b == nullptr))) {
    fail("null matrix pointer for a non-empty product");
  }
  const StoredMatrix<S> A{a, trans_a ? k : m, a_cols, lda}, B{b, trans_b ? n : k, b_cols, ldb},
      C{c, m, n, ldc};
  // Every extent within 2^62 bytes and the address space: rows never alias by wrapping.
  for (const auto& [x, name] : {std::pair{&A, "A"}, std::pair{&B, "B"}, std::pair{&C, "C"}}) {
    if (x->empty()) continue;
    const auto bytes = static_cast<std::uintptr_t>(x->extent(name)) * sizeof(S);
    if (reinterpret_cast<std::uintptr_t>(x->p) > UINTPTR_MAX - bytes) {
      fail(std::string(name) + " at " + std::to_string(reinterpret_cast<std::uintptr_t>(x->p)) +
           " with an extent of " + std::to_string(bytes) + " bytes wraps around the address space");
    }
  }
  // C is written while A and B are read: they must not share an element.
  if (reads_ab && !C.empty()) {
    if (!A.empty() && share_elements(A, C))
      fail("C overlaps A; expected an output that shares no element with A or B");
    if (!B.empty() && share_elements(B, C))
      fail("C overlaps B; expected an output that shares no element with A or B");
  }
}

/// C = alpha op(A) op(B) + beta C for one tile, serially, with Eigen's kernel.
template <class S>
void eigen_gemm_tile(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
                     S alpha, const S* a, std::int64_t lda, const S* b, std::int64_t ldb, S beta,
                     S* c, std::int64_t ldc) {
  using Row = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using CMap = Eigen::Map<const Row, 0, Eigen::OuterStride<>>;
  Eigen::Map<Row, 0, Eigen::OuterStride<>> C(c, m, n, Eigen::OuterStride<>(ldc));
  if (k == 0) {
    if (beta == S(0))
      C.setZero();
    else
      C *= beta;
    return;
  }
  const CMap A(a, trans_a ? k : m, trans_a ? m : k, Eigen::OuterStride<>(lda));
  const CMap B(b, trans_b ? n : k, trans_b ? k : n, Eigen::OuterStride<>(ldb));
  // alpha == 1 (every product of the layer's forward) without the scaling expression: with
  // it, Eigen's matrix-vector path (m == 1) copies the scaled operand to the heap.
  auto run = [&](const auto& opa, const auto& opb) {
    if (beta == S(0)) {
      if (alpha == S(1))
        C.noalias() = opa * opb;
      else
        C.noalias() = alpha * (opa * opb);
    } else {
      if (beta != S(1)) C *= beta;
      if (alpha == S(1))
        C.noalias() += opa * opb;
      else
        C.noalias() += alpha * (opa * opb);
    }
  };
  if (!trans_a && !trans_b)
    run(A, B);
  else if (!trans_a)
    run(A, B.transpose());
  else if (!trans_b)
    run(A.transpose(), B);
  else
    run(A.transpose(), B.transpose());
}

template <class S>
void eigen_gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, S alpha,
                const S* a, std::int64_t lda, const S* b, std::int64_t ldb, S beta, S* c,
                std::int64_t ldc) {
  const std::int64_t tm = (m + kGemmTileRows - 1) / kGemmTileRows;
  const std::int64_t tn = (n + kGemmTileCols - 1) / kGemmTileCols;
  auto tile = [&](std::int64_t t) {
    const std::int64_t i0 = (t / tn) * kGemmTileRows, j0 = (t % tn) * kGemmTileCols;
    const std::int64_t mb = std::min(kGemmTileRows, m - i0), nb = std::min(kGemmTileCols, n - j0);
    const S* ab = trans_a ? a + i0 : a + i0 * lda;
    const S* bb = trans_b ? b + j0 * ldb : b + j0;
    eigen_gemm_tile(trans_a, trans_b, mb, nb, k, alpha, ab, lda, bb, ldb, beta, c + i0 * ldc + j0,
                    ldc);
  };
  const std::int64_t tiles = tm * tn;
#ifdef _OPENMP
  if (omp_in_parallel()) {  // inside the caller's threads: one tile at a time, Eigen serial too
    for (std::int64_t t = 0; t < tiles; ++t) tile(t);
    return;
  }
#endif
  // A row times a matrix (m == 1) is Eigen's matrix-vector product, which never threads: one
  // tile of it runs here. Every other product runs inside a team, even for one tile: Eigen
  // threads a matrix product itself when called outside one, with blocking (so rounding) that
  // depends on the thread count.
  if (tiles == 1 && m == 1) return tile(0);
  struct None {};
  blocks_in_team(
      tiles, 1, [](int) { return None{}; },
      [&](None&, std::int64_t t0, std::int64_t) { tile(t0); });
}

#if defined(PKM_WITH_BLIS)
template <class S>
void blis_gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, S alpha,
               const S* a, std::int64_t lda, const S* b, std::int64_t ldb, S beta, S* c,
               std::int64_t ldc) {
  rntm_t rntm = BLIS_RNTM_INITIALIZER;
  int threads = 1;
#ifdef _OPENMP
  threads = omp_in_parallel() ? 1 : omp_get_max_threads();
#endif
  bli_rntm_set_num_threads(threads, &rntm);
  const trans_t ta = trans_a ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE;
  const trans_t tb = trans_b ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE;
  // BLIS takes non-const pointers; it does not write A or B.
  S* pa = const_cast<S*>(a);
  S* pb = const_cast<S*>(b);
  if constexpr (std::is_same_v<S, float>) {
    bli_sgemm_ex(ta, tb, m, n, k, &alpha, pa, lda, 1, pb, ldb, 1, &beta, c, ldc, 1, nullptr, &rntm);
  } else {
    bli_dgemm_ex(ta, tb, m, n, k, &alpha, pa, lda, 1, pb, ldb, 1, &beta, c, ldc, 1, nullptr, &rntm);
  }
}
#endif

#if defined(PKM_WITH_OPENBLAS)
template <class S>
void openblas_gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
                   S alpha, const S* a, std::int64_t lda, const S* b, std::int64_t ldb, S beta,
                   S* c, std::int64_t ldc) {
  const auto ta = trans_a ? CblasTrans : CblasNoTrans, tb = trans_b ? CblasTrans : CblasNoTrans;
  if constexpr (std::is_same_v<S, float>) {
    cblas_sgemm(CblasRowMajor, ta, tb, int(m), int(n), int(k), alpha, a, int(lda), b, int(ldb),
                beta, c, int(ldc));
  } else {
    cblas_dgemm(CblasRowMajor, ta, tb, int(m), int(n), int(k), alpha, a, int(lda), b, int(ldb),
                beta, c, int(ldc));
  }
}
#endif

/// True where pkm::gemm on `backend` computes op(A) op(B) with the small-batch kernel
/// (detail/gemm_small.hpp): x W^T for at most kSmallGemmRows rows, on a deterministic backend.
inline bool takes_small_kernel(bool trans_a, bool trans_b, std::int64_t m, GemmBackend backend) {
  return small_batch_product(trans_a, trans_b, m) && backend != GemmBackend::openblas;
}

/// C = beta C for m x n C (ldc); beta == 0: C is not read. BLAS's rule where A and B are not
/// read (alpha == 0 or k == 0).
template <class S>
void scale_c(std::int64_t m, std::int64_t n, S beta, S* c, std::int64_t ldc) {
  for (std::int64_t i = 0; i < m; ++i) {
    S* row = c + i * ldc;
    if (beta == S(0))
      std::fill(row, row + n, S(0));
    else if (beta != S(1))
      for (std::int64_t j = 0; j < n; ++j) row[j] *= beta;
  }
}

}  // namespace detail

/// C (m x n) = alpha op(A) op(B) + beta C, row-major: op(A) is m x k (A stored k x m when
/// trans_a), op(B) is k x n (B stored n x k when trans_b); lda / ldb / ldc are the distances
/// between consecutive stored rows. With beta == 0, C is not read (it may hold NaN). With
/// alpha == 0 (or k == 0), A and B are not read at all — NaN there does not reach C — and
/// C = beta C, on every backend (BLAS's rule). C must share no element with A or B (where A
/// and B are read); A and B may share elements with each other.
/// Runs on `backend` (default: gemm_backend()); throws std::invalid_argument for negative
/// sizes, too-small leading dimensions, null pointers, an extent above 2^62 bytes or one that
/// wraps the address space, C overlapping A or B, or a backend not compiled in.
template <class S>
void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, S alpha,
          const S* a, std::int64_t lda, const S* b, std::int64_t ldb, S beta, S* c,
          std::int64_t ldc, GemmBackend backend = gemm_backend()) {
  static_assert(std::is_same_v<S, float> || std::is_same_v<S, double>,
                "pkm::gemm: float or double");
  const bool reads_ab = k > 0 && alpha != S(0);
  detail::check_gemm_args(trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc, reads_ab);
  if (!gemm_backend_available(backend)) {
    throw std::invalid_argument(
        std::string("pkm::gemm: backend ") + gemm_backend_name(backend) +
        " was not compiled in (configure with PKM_BLAS=" + gemm_backend_name(backend) + ")");
  }
  if (m == 0 || n == 0) return;
  if (!reads_ab) {  // BLAS's rule on every backend: A and B are not read; C = beta C (0: not read)
    detail::scale_c(m, n, beta, c, ldc);
    return;
  }
  if (backend == GemmBackend::openblas &&
      std::max({m, n, k, lda, ldb, ldc}) > std::int64_t(INT32_MAX)) {
    throw std::invalid_argument(
        "pkm::gemm: sizes or leading dimensions above 2^31 - 1 need the eigen or "
        "blis backend (OpenBLAS takes 32-bit ints)");
  }
  // A few rows times a matrix stored by rows (the layer's forward at a small batch): the
  // small-batch kernel on the deterministic backends (detail/gemm_small.hpp).
  if (detail::takes_small_kernel(trans_a, trans_b, m, backend))
    return detail::gemm_small_nt(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  switch (backend) {
    case GemmBackend::blis:
#if defined(PKM_WITH_BLIS)
      if (k > 0)
        return detail::blis_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
#endif
      break;
    case GemmBackend::openblas:
#if defined(PKM_WITH_OPENBLAS)
      if (k > 0)
        return detail::openblas_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c,
                                     ldc);
#endif
      break;
    case GemmBackend::eigen:
      break;
  }
  detail::eigen_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace pkm
