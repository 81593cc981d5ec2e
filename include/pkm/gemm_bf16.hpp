// pkm/gemm_bf16.hpp — matrix products at the CPU's bf16 rate:
//
//   C (m x n) = alpha * op(A) * op(B) + beta * C,   A, B, C float, row-major (as pkm::gemm),
//
// with every element of A and B rounded to bf16 (nearest even) before it is multiplied, the
// products (exact in fp32) summed in fp32. This is what torch.autocast(dtype=bfloat16) does
// to a matmul on the CPU, and what the layer's products run as with MemoryConfig::compute =
// Dtype::bf16 (pkm/linear.hpp). Inputs stay float: the rounding is fused into the packing of
// the operands (detail/gemm_bf16_kernels.hpp), so a layer keeps one fp32 copy of its weights.
//
// Kernels, chosen at run time (one binary runs everywhere):
//   avx512_bf16  vdpbf16ps (AMD Zen 4/5, Intel Cooper Lake and later): 32 products per
//                instruction, twice the fp32 FMA rate.
//   portable     the same arithmetic in plain C++, vectorised for the build's ISA (fp32
//                FMAs on widened bf16): the path on CPUs without AVX512-BF16, and the
//                emulation CI tests the fast kernel against.
// bf16_kernel() picks the fast one where the CPU has it, unless the environment sets
// PKM_BF16_KERNEL=portable.
//
// Determinism: C is cut into tiles whose bounds depend only on (m, n); each tile is computed
// by one thread, its k loop in fixed chunks: the same bits with any thread count (on the same
// kernel). Both operands are packed per call (the packed operands are allocated per call),
// unless B is a weight packed once (PackedBf16Matrix, gemm_bf16_nt): the layer's forward
// keeps its weights packed that way (pkm/packed_weights.hpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "pkm/detail/gemm_bf16_kernels.hpp"
#include "pkm/detail/parallel.hpp"
#include "pkm/gemm.hpp"

namespace pkm {

enum class Bf16Kernel { avx512_bf16, portable };

inline const char* bf16_kernel_name(Bf16Kernel k) {
  return k == Bf16Kernel::avx512_bf16 ? "avx512_bf16" : "portable";
}

/// True when kernel `k` runs on this CPU (portable always does).
inline bool bf16_kernel_available(Bf16Kernel k) {
  return k == Bf16Kernel::portable || detail::cpu_has_avx512_bf16();
}

namespace detail {
inline bool portable_bf16_forced() {
  const char* env = std::getenv("PKM_BF16_KERNEL");
  return env != nullptr && std::strcmp(env, "portable") == 0;
}
}  // namespace detail

/// The kernel gemm_bf16 uses by default here: avx512_bf16 where the CPU has it, unless the
/// environment variable PKM_BF16_KERNEL is "portable".
inline Bf16Kernel bf16_kernel() {
  if (detail::portable_bf16_forced()) return Bf16Kernel::portable;
  return bf16_kernel_available(Bf16Kernel::avx512_bf16) ? Bf16Kernel::avx512_bf16
                                                        : Bf16Kernel::portable;
}

/// True where a layer's bf16 products (MemoryConfig::compute = Dtype::bf16) run as bf16: the
/// CPU has AVX512-BF16, or PKM_BF16_KERNEL=portable asks for the emulation (as CI does on
/// CPUs without it). Elsewhere the layer computes those products in fp32: the portable kernel
/// is slower than fp32 there (140 against 192 GFLOP/s in an AVX2-only build on Zen 4).
/// pkm::gemm_bf16 itself always rounds, on any CPU.
inline bool bf16_products_here() {
  return detail::portable_bf16_forced() || bf16_kernel_available(Bf16Kernel::avx512_bf16);
}

namespace detail {

/// Tiles of C one thread computes (multiples of the micro-tile), and k pairs per chunk (a
/// B panel's chunk, 512 x 64 pairs = 128 KiB, stays in L2 while the tile's 32 A panels pass
/// it; 512 measured faster than 128 or 256 at the layer's shapes on Zen 4).
inline constexpr std::int64_t kBf16TileRows = kBf16MR * 32;  // 192
inline constexpr std::int64_t kBf16TileCols = kBf16NR * 4;   // 256
inline constexpr std::int64_t kBf16KcPairs = 512;

/// Values a packed operand of `rows` R-row panels over k takes: pairs(k) * R * 2 per panel.
template <int R>
std::int64_t packed_size(std::int64_t rows, std::int64_t k) {
  return (rows + R - 1) / R * ((k + 1) / 2) * R * 2;
}

/// Packs panels [p0, p1) of R rows of a matrix whose rows are contiguous along k (element
/// (r, p) = x[r * s_row + p]) into `dst` (panel q at dst + q * pairs(k) * R * 2), by the
/// calling thread.
template <int R>
void pack_bf16_panels(const float* x, std::int64_t s_row, std::int64_t rows, std::int64_t k,
                      std::int64_t p0, std::int64_t p1, std::uint16_t* dst) {
  const std::int64_t size = (k + 1) / 2 * R * 2;
  for (std::int64_t p = p0; p < p1; ++p)
    pack_bf16_panel<R>(x + p * R * s_row, s_row, std::min<std::int64_t>(R, rows - p * R), k,
                       dst + p * size);
}

/// Packs the panels of R rows (R = MR for A: rows of op(A); R = NR for B: columns of op(B))
/// of a matrix whose element (r, p) is x[r * s_row + p * s_k] (one of s_row, s_k is 1) into
/// `dst`, panel after panel, each pairs(k) * R * 2 values. Packing is exact: any split over
/// threads gives the same bytes.
template <int R>
void pack_bf16_all(const float* x, std::int64_t s_row, std::int64_t s_k, std::int64_t rows,
                   std::int64_t k, std::uint16_t* dst) {
  const std::int64_t panels = (rows + R - 1) / R, pairs = (k + 1) / 2;
  if (s_k == 1) {  // rows contiguous along k: panel by panel
    parallel_blocks(panels, 8, [&](std::int64_t p0, std::int64_t p1) {
      pack_bf16_panels<R>(x, s_row, rows, k, p0, p1, dst);
    });
  } else {  // s_row == 1: each k index's row of all panels at once, one scratch row a thread
    using Row = std::vector<std::uint32_t>;
    parallel_blocks_with<Row>(pairs, 16, [&](Row& pair_row, std::int64_t t0, std::int64_t t1) {
      pair_row.resize(static_cast<std::size_t>(panels * R));
      pack_bf16_pairs<R>(x, s_k, rows, k, t0, t1, pair_row.data(), dst);
    });
  }
}

/// C[i0, i1) x [j0, j1) = alpha A B + beta C from the packed panels of A and B (i0 a multiple
/// of kBf16MR, j0 of kBf16NR), by the calling thread: for each fixed chunk of k (kBf16KcPairs
/// pairs), each micro-tile's product added to C in order. An element's value depends only on
/// its row of A, its column of B and k, not on the block it is computed in.
inline void gemm_bf16_block(std::int64_t i0, std::int64_t i1, std::int64_t j0, std::int64_t j1,
                            std::int64_t k, float alpha, const std::uint16_t* ap,
                            const std::uint16_t* bp, float beta, float* c, std::int64_t ldc,
                            Bf16Kernel kernel) {
  constexpr int MR = kBf16MR, NR = kBf16NR;
  const std::int64_t pairs = (k + 1) / 2;
  alignas(64) float acc[MR * NR];
  for (std::int64_t t0 = 0; t0 < pairs; t0 += kBf16KcPairs) {
    const std::int64_t tc = std::min(kBf16KcPairs, pairs - t0);
    for (std::int64_t j = j0; j < j1; j += NR) {
      const std::uint16_t* bpanel = bp + (j / NR * pairs + t0) * NR * 2;
      const std::int64_t nc = std::min<std::int64_t>(NR, j1 - j);
      for (std::int64_t i = i0; i < i1; i += MR) {
        const std::uint16_t* apanel = ap + (i / MR * pairs + t0) * MR * 2;
#ifdef PKM_X86_BF16_KERNEL
        if (kernel == Bf16Kernel::avx512_bf16)
          bf16_tile_avx512(apanel, bpanel, tc, acc);
        else
#endif
          bf16_tile_portable(apanel, bpanel, tc, acc);
        const std::int64_t mr = std::min<std::int64_t>(MR, i1 - i);
        for (std::int64_t r = 0; r < mr; ++r) {
          float* crow = c + (i + r) * ldc + j;
          const float* arow = acc + r * NR;
          if (t0 > 0 || beta == 1.0f) {
            for (std::int64_t q = 0; q < nc; ++q) crow[q] += alpha * arow[q];
          } else if (beta == 0.0f) {
            for (std::int64_t q = 0; q < nc; ++q) crow[q] = alpha * arow[q];
          } else {
            for (std::int64_t q = 0; q < nc; ++q) crow[q] = alpha * arow[q] + beta * crow[q];
          }
        }
      }
    }
  }
}

/// C = alpha A B + beta C from the packed panels of A (m rows) and B (n columns), in tiles
/// whose bounds depend only on (m, n), one thread a tile (gemm_bf16_block); a decoding batch
/// (m <= kSmallGemmRows) gets tiles one micro-tile wide, so that its few rows still spread
/// over the threads.
inline void gemm_bf16_packed(std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                             const std::uint16_t* ap, const std::uint16_t* bp, float beta, float* c,
                             std::int64_t ldc, Bf16Kernel kernel) {
  const std::int64_t tile_cols = m <= kSmallGemmRows ? kBf16NR : kBf16TileCols;
  const std::int64_t tm = (m + kBf16TileRows - 1) / kBf16TileRows;
  const std::int64_t tn = (n + tile_cols - 1) / tile_cols;
  struct None {};
  blocks_in_team(
      tm * tn, 1, [](int) { return None{}; },
      [&](None&, std::int64_t t, std::int64_t) {
        const std::int64_t i0 = (t / tn) * kBf16TileRows, j0 = (t % tn) * tile_cols;
        gemm_bf16_block(i0, std::min(m, i0 + kBf16TileRows), j0, std::min(n, j0 + tile_cols), k,
                        alpha, ap, bp, beta, c, ldc, kernel);
      });
}

/// Packs the rows of x (m x k, leading dimension lda) as gemm_bf16's A operand into `dst`
/// (packed_size<kBf16MR>(m, k) values) by the calling thread: for a few rows, where a
/// parallel region would cost more than the packing.
inline void pack_bf16_rows(const float* x, std::int64_t lda, std::int64_t m, std::int64_t k,
                           std::uint16_t* dst) {
  pack_bf16_panels<kBf16MR>(x, lda, m, k, 0, (m + kBf16MR - 1) / kBf16MR, dst);
}

}  // namespace detail

/// A matrix W (n x k, row-major, leading dimension ldw) rounded to bf16 and packed once as
/// the B operand of x W^T: gemm_bf16_nt with it gives gemm_bf16(false, true, ..., W, ...)'s
/// bits without reading W's floats or packing them again (half the bytes, no packing per
/// call). It is a copy: later changes of W do not reach it (pkm/packed_weights.hpp keeps a
/// layer's copies current). An empty one (default) packs nothing.
class PackedBf16Matrix {
 public:
  PackedBf16Matrix() = default;
  /// Throws std::invalid_argument for negative sizes, ldw < max(1, k), a null W that is not
  /// empty, or a packed size beyond 2^62 bytes.
  PackedBf16Matrix(const float* w, std::int64_t n, std::int64_t k, std::int64_t ldw) {
    assign(w, n, k, ldw);
  }
  /// Copies are deep; a moved-from one is empty.
  PackedBf16Matrix(const PackedBf16Matrix& o) : n_(o.n_), k_(o.k_), size_(o.size_), src_(o.src_) {
    if (size_ > 0) {
      panels_.reset(new std::uint16_t[static_cast<std::size_t>(size_)]);
      capacity_ = size_;
      std::copy(o.panels_.get(), o.panels_.get() + size_, panels_.get());
    }
  }
  PackedBf16Matrix(PackedBf16Matrix&& o) noexcept { swap(o); }
  PackedBf16Matrix& operator=(PackedBf16Matrix o) noexcept {
    swap(o);
    return *this;
  }
  void swap(PackedBf16Matrix& o) noexcept {
    std::swap(n_, o.n_);
    std::swap(k_, o.k_);
    std::swap(size_, o.size_);
    std::swap(capacity_, o.capacity_);
    std::swap(src_, o.src_);
    std::swap(panels_, o.panels_);
  }
  /// Packs W instead, in the buffer it has where that is large enough (a caller that packs
  /// matrices of one size again and again allocates once). Throws as the constructor, and
  /// then leaves this one unchanged.
  void assign(const float* w, std::int64_t n, std::int64_t k, std::int64_t ldw) {
    const char* who = "pkm::PackedBf16Matrix";
    if (n < 0 || k < 0 || ldw < std::max<std::int64_t>(1, k)) {
      throw std::invalid_argument(std::string(who) + ": W is " + std::to_string(n) + " x " +
                                  std::to_string(k) + " with ldw = " + std::to_string(ldw) +
                                  "; expected sizes >= 0 and ldw >= max(1, k)");
    }
    std::int64_t size = 0;
    if (n > 0 && k > 0) {
      if (w == nullptr) throw std::invalid_argument(std::string(who) + ": W is null");
      const std::int64_t panels = (n + detail::kBf16NR - 1) / detail::kBf16NR;
      const std::int64_t pair_cols = detail::checked_mul(who, "pairs(k) x 2", (k + 1) / 2, 2);
      size = detail::checked_mul(
          who, "packed elements", detail::checked_mul(who, "panels x 64", panels, detail::kBf16NR),
          pair_cols, detail::kMaxBytes / sizeof(std::uint16_t));
      if (size > capacity_) {
        panels_.reset(new std::uint16_t[static_cast<std::size_t>(size)]);
        capacity_ = size;
      }
      detail::pack_bf16_all<detail::kBf16NR>(w, ldw, 1, n, k, panels_.get());
    }
    n_ = n;
    k_ = k;
    size_ = size;
    src_ = w;
  }
  std::int64_t rows() const { return n_; }
  std::int64_t cols() const { return k_; }
  /// The W it was packed from (compared, never read, by the layer's products).
  const float* source() const { return src_; }
  const std::uint16_t* panels() const { return panels_.get(); }

 private:
  std::int64_t n_ = 0, k_ = 0, size_ = 0, capacity_ = 0;
  const float* src_ = nullptr;
  std::unique_ptr<std::uint16_t[]> panels_;
};

/// C (m x n) = alpha x W^T + beta C with W packed beforehand (n = w.rows(), k = w.cols()):
/// the bits of gemm_bf16(false, true, m, n, k, alpha, x, lda, W, ldw, beta, c, ldc, kernel) at
/// any m and thread count. `x_pack` is scratch for x's packed rows: grown when too small, so a
/// caller reusing it allocates nothing once it has seen the largest batch. The rules for
/// alpha == 0, k == 0 and beta == 0 are pkm::gemm's. Throws std::invalid_argument for bad
/// sizes, leading dimensions or pointers, C sharing an element with x, or a kernel this CPU
/// lacks.
inline void gemm_bf16_nt(std::int64_t m, float alpha, const float* x, std::int64_t lda,
                         const PackedBf16Matrix& w, float beta, float* c, std::int64_t ldc,
                         std::vector<std::uint16_t>& x_pack, Bf16Kernel kernel = bf16_kernel()) {
  const std::int64_t n = w.rows(), k = w.cols();
  auto fail = [](const std::string& what) {
    throw std::invalid_argument("pkm::gemm_bf16_nt: " + what);
  };
  if (m < 0) fail("m = " + std::to_string(m) + "; expected m >= 0");
  if (lda < std::max<std::int64_t>(1, k))
    fail("lda = " + std::to_string(lda) + " < k = " + std::to_string(k));
  if (ldc < std::max<std::int64_t>(1, n))
    fail("ldc = " + std::to_string(ldc) + " < n = " + std::to_string(n));
  if (m > 0 && n > 0 && (c == nullptr || (k > 0 && x == nullptr)))
    fail("null matrix pointer for a non-empty product");
  if (!bf16_kernel_available(kernel)) {
    fail(std::string("kernel ") + bf16_kernel_name(kernel) +
         " is not available on this CPU (it lacks AVX512-BF16)");
  }
  if (m == 0 || n == 0) return;
  const bool reads_ab = k > 0 && alpha != 0.0f;
  const detail::StoredMatrix<float> A{x, m, k, lda}, C{c, m, n, ldc};
  (void)C.extent("C");
  if (reads_ab && detail::share_elements(A, C))
    fail("C overlaps x; expected an output that shares no element with x");
  if (!reads_ab) {  // x and W are not read; C = beta C (0: not read)
    detail::scale_c(m, n, beta, c, ldc);
    return;
  }
  const auto a_size = static_cast<std::size_t>(detail::packed_size<detail::kBf16MR>(m, k));
  if (x_pack.size() < a_size) x_pack.resize(a_size);
  detail::pack_bf16_all<detail::kBf16MR>(x, lda, 1, m, k, x_pack.data());
  detail::gemm_bf16_packed(m, n, k, alpha, x_pack.data(), w.panels(), beta, c, ldc, kernel);
}

/// C (m x n) = alpha op(A) op(B) + beta C with A's and B's elements rounded to bf16 and fp32
/// sums (see the top of this file). Arguments, the rules for alpha == 0, k == 0 and beta == 0,
/// and the errors are pkm::gemm's; throws std::invalid_argument for a kernel this CPU lacks.
inline void gemm_bf16(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
                      float alpha, const float* a, std::int64_t lda, const float* b,
                      std::int64_t ldb, float beta, float* c, std::int64_t ldc,
                      Bf16Kernel kernel = bf16_kernel()) {
  const bool reads_ab = k > 0 && alpha != 0.0f;
  detail::check_gemm_args(trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc, reads_ab);
  if (!bf16_kernel_available(kernel)) {
    throw std::invalid_argument(std::string("pkm::gemm_bf16: kernel ") + bf16_kernel_name(kernel) +
                                " is not available on this CPU (it lacks AVX512-BF16)");
  }
  if (m == 0 || n == 0) return;
  if (!reads_ab) {  // pkm::gemm's rule: A and B are not read
    gemm<float>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  // Packed sizes: below 2^62 bytes since A and B passed the extent checks (k x m, k x n).
  // Not zeroed: packing writes every element.
  const auto a_size = static_cast<std::size_t>(detail::packed_size<detail::kBf16MR>(m, k));
  const auto b_size = static_cast<std::size_t>(detail::packed_size<detail::kBf16NR>(n, k));
  std::unique_ptr<std::uint16_t[]> ap(new std::uint16_t[a_size]), bp(new std::uint16_t[b_size]);
  // op(A) element (i, p): A[i lda + p], or A[p lda + i] when transposed; op(B) element
  // (p, j) seen as B-panel row j: B[j ldb + p], or B[p ldb + j] when not transposed.
  detail::pack_bf16_all<detail::kBf16MR>(a, trans_a ? 1 : lda, trans_a ? lda : 1, m, k, ap.get());
  detail::pack_bf16_all<detail::kBf16NR>(b, trans_b ? ldb : 1, trans_b ? 1 : ldb, n, k, bp.get());
  detail::gemm_bf16_packed(m, n, k, alpha, ap.get(), bp.get(), beta, c, ldc, kernel);
}

}  // namespace pkm
