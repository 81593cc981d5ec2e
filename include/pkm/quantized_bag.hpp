// pkm/quantized_bag.hpp — the read of a memory layer over a quantized table (forward only):
//
//   out(b, :) = sum_l weights(b, l) * dequantized row indices(b, l)
//
// Codes widen to float in registers and the bag's sum stays there (no dequantized copy of a
// row in memory); a row's scale is applied once per row and the biases once per token
// (pkm/detail/quantized_kernels.hpp). The kernel (avx512, avx2, portable) is chosen at run time
// from the CPU; all three give the same bits, at any thread count (tokens split over threads,
// each token's sum in bag order). There is no backward: quantized tables serve inference.
#pragma once

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "pkm/detail/checks.hpp"
#include "pkm/detail/parallel.hpp"
#include "pkm/detail/quantized_kernels.hpp"
#include "pkm/detail/vec_math.hpp"
#include "pkm/quantized_table.hpp"
#include "pkm/types.hpp"

namespace pkm {

/// The read's kernels over quantized rows.
enum class QuantKernel { avx512, avx2, portable };

constexpr const char* quant_kernel_name(QuantKernel k) {
  switch (k) {
    case QuantKernel::avx512:
      return "avx512";
    case QuantKernel::avx2:
      return "avx2";
    case QuantKernel::portable:
      return "portable";
  }
  return "?";
}

/// True where this CPU runs the kernel (portable: everywhere).
inline bool quant_kernel_available(QuantKernel k) {
  switch (k) {
    case QuantKernel::avx512:
      return detail::cpu_has_quant_avx512();
    case QuantKernel::avx2:
      return detail::cpu_has_quant_avx2();
    case QuantKernel::portable:
      return true;
  }
  return false;
}

/// The kernel the read uses by default: the widest this CPU runs, or the one the environment
/// variable PKM_QUANT_KERNEL names (avx512, avx2, portable). Throws std::invalid_argument for
/// a name that is not a kernel or a kernel this CPU lacks.
inline QuantKernel quant_kernel() {
  if (const char* env = std::getenv("PKM_QUANT_KERNEL")) {
    for (QuantKernel k : {QuantKernel::avx512, QuantKernel::avx2, QuantKernel::portable}) {
      if (std::strcmp(env, quant_kernel_name(k)) != 0) continue;
      if (!quant_kernel_available(k)) {
        throw std::invalid_argument(std::string("PKM_QUANT_KERNEL = ") + env +
                                    ": this CPU lacks the instructions of that kernel");
      }
      return k;
    }
    throw std::invalid_argument(std::string("PKM_QUANT_KERNEL = \"") +
                                std::string(env).substr(0, 32) +
                                "\"; expected avx512, avx2 or portable");
  }
  if (quant_kernel_available(QuantKernel::avx512)) return QuantKernel::avx512;
  if (quant_kernel_available(QuantKernel::avx2)) return QuantKernel::avx2;
  return QuantKernel::portable;
}

namespace detail {
/// One token's read with kernel k (no checks).
/// next_idx: the next token's rows, to prefetch while this one is summed (or null);
/// prefetched: this token's rows were prefetched so by the previous token.
inline void quant_bag_sum(QuantKernel k, const QuantizedTable& t, const std::int64_t* idx,
                          const float* w, Index bag, float* out,
                          const std::int64_t* next_idx = nullptr, bool prefetched = false) {
  const QuantRowFormat f = quant_row_format(t.format(), t.dim());
#ifdef PKM_QUANT_X86
  auto simd = [&](auto kernel_for) {
    switch (f.format) {
      case Dtype::int8_rowwise:
        kernel_for(std::integral_constant<Dtype, Dtype::int8_rowwise>{});
        return;
      case Dtype::int4_rowwise:
        kernel_for(std::integral_constant<Dtype, Dtype::int4_rowwise>{});
        return;
      default:
        kernel_for(std::integral_constant<Dtype, Dtype::fp8_rowwise>{});
        return;
    }
  };
  if (k == QuantKernel::avx512) {
    simd([&](auto F) { quant_bag_avx512<decltype(F)::value>(f, t.data(), t.stride(), idx, w, bag, out, next_idx, prefetched); });
    return;
  }
  if (k == QuantKernel::avx2) {
    simd([&](auto F) { quant_bag_avx2<decltype(F)::value>(f, t.data(), t.stride(), idx, w, bag, out, next_idx, prefetched); });
    return;
  }
#else
  (void)k, (void)next_idx, (void)prefetched;
#endif
  quant_bag_portable(f, t.data(), t.stride(), idx, w, bag, out);
}
}  // namespace detail

/// pkm's read over a quantized table with the given kernel: out(b, :) = sum_l weights(b, l)
/// row(indices(b, l)) dequantized. Throws std::invalid_argument, before writing anything, for
/// mismatched shapes, an index outside the table or a kernel this CPU lacks.
inline void embedding_bag(const QuantizedTable& table, const ConstIndexRef& indices,
                          const ConstMatrixRef<float>& weights, MatrixRef<float> out,
                          QuantKernel kernel) {
  const char* who = "pkm::embedding_bag (quantized)";
  detail::check_same_shape(who, "weights", weights.rows(), weights.cols(), indices.rows(),
                           indices.cols());
  detail::check_same_shape(who, "out", out.rows(), out.cols(), indices.rows(), table.dim());
  detail::check_indices(who, indices, table.rows());
  if (!quant_kernel_available(kernel)) {
    throw std::invalid_argument(std::string(who) + ": kernel " + quant_kernel_name(kernel) +
                                " is not available on this CPU");
  }
  const Index bag = indices.cols();
  detail::parallel_blocks(indices.rows(), 8, [&](Index begin, Index end) {
    for (Index b = begin; b < end; ++b) {
      detail::quant_bag_sum(kernel, table, indices.row(b).data(), weights.row(b).data(), bag,
                            out.row(b).data(), b + 1 < end ? indices.row(b + 1).data() : nullptr,
                            b > begin);
    }
  });
}

/// As above with the default kernel (pkm::quant_kernel()).
inline void embedding_bag(const QuantizedTable& table, const ConstIndexRef& indices,
                          const ConstMatrixRef<float>& weights, MatrixRef<float> out) {
  embedding_bag(table, indices, weights, out, quant_kernel());
}

namespace detail {
/// Throws std::runtime_error if a token's read is not finite, naming the table row at fault
/// (a NaN or infinite scale or bias) or the overflow. The kernels read an fp8 NaN code (which
/// pkm never writes, and a copying load refuses) as +-480 times the scale: a finite read is
/// not rescanned for them (pkm::first_invalid_row checks a mapped table on demand).
inline void check_bag_read(const char* who, const QuantizedTable& table,
                           const ConstIndexRef& indices, const ConstMatrixRef<float>& read,
                           const std::string& note = "") {
  parallel_blocks(read.rows(), kTokenBlock, [&](Index b0, Index b1) {
    for (Index b = b0; b < b1; ++b) {
      if (all_finite(read.row(b).data(), read.cols())) continue;
      for (Index l = 0; l < indices.cols(); ++l) {
        const Index r = indices(b, l);
        if (!quantized_row_valid(table.format(), table.row(r), table.dim())) {
          throw std::runtime_error(std::string(who) + ": value table row " + std::to_string(r) +
                                   ", read by token " + std::to_string(b) + ", is not a valid " +
                                   dtype_name(table.format()) +
                                   " row (a NaN or infinite scale or bias, or an fp8 NaN code); "
                                   "pkm::first_invalid_row finds every such row" +
                                   note);
        }
      }
      throw std::runtime_error(
          std::string(who) + ": the read of token " + std::to_string(b) +
          " overflows: the value rows it reads are valid but their weighted sum is not" + note);
    }
  });
}
}  // namespace detail

}  // namespace pkm
