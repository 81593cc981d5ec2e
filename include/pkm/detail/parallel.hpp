// pkm/detail/parallel.hpp — deterministic OpenMP loops over fixed-size blocks.
//
// Work is cut into blocks whose bounds depend only on the problem size, never on the thread
// count; each block is computed by one thread with a fixed order of operations. The same
// inputs therefore give the same bits with 1 or many threads. Eigen products called inside a
// block run serially (Eigen does not parallelise inside an active OpenMP team), so their
// blocking — and rounding — does not change with the thread count either.
#pragma once

#include <cstdint>
#include <exception>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pkm::detail {

/// Tokens per block in batched loops: a multiple of every GEMM micro-kernel's row count.
inline constexpr std::int64_t kTokenBlock = 64;

/// Calls fn(scratch, begin, end) for consecutive blocks [begin, end) of [0, total) of size
/// `block`, with one default-constructed Scratch per thread. An exception thrown by fn is
/// carried out of the parallel region and rethrown (the one from the lowest block).
template <class Scratch, class F>
void parallel_blocks_with(std::int64_t total, std::int64_t block, F&& fn) {
  if (total <= 0) return;
  const std::int64_t nblocks = (total + block - 1) / block;
  std::exception_ptr error;
  std::int64_t error_block = nblocks;
#pragma omp parallel
  {
    Scratch scratch{};
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t b = 0; b < nblocks; ++b) {
      const std::int64_t begin = b * block;
      const std::int64_t end = begin + block < total ? begin + block : total;
      try {
        fn(scratch, begin, end);
      } catch (...) {
#pragma omp critical(pkm_parallel_error)
        if (b < error_block) {
          error_block = b;
          error = std::current_exception();
        }
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

/// Calls fn(begin, end) for consecutive blocks [begin, end) of [0, total) of size `block`.
template <class F>
void parallel_blocks(std::int64_t total, std::int64_t block, F&& fn) {
  struct None {};
  parallel_blocks_with<None>(total, block,
                             [&](None&, std::int64_t begin, std::int64_t end) { fn(begin, end); });
}

/// Calls fn(i) for each i in [0, total); iterations must be independent.
template <class F>
void parallel_for(std::int64_t total, F&& fn) {
  parallel_blocks(total, 256, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t i = begin; i < end; ++i) fn(i);
  });
}

}  // namespace pkm::detail
