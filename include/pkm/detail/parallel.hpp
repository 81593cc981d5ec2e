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
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pkm::detail {

/// Tokens per block in batched loops: a multiple of every GEMM micro-kernel's row count.
inline constexpr std::int64_t kTokenBlock = 64;

/// Calls fn(scratch, begin, end) for consecutive blocks [begin, end) of [0, total) of size
/// `block` inside an OpenMP team (even for one block), scratch(thread) giving each call its
/// thread's scratch. An exception thrown by fn is carried out of the parallel region and
/// rethrown (the one from the lowest block).
template <class ScratchOf, class F>
void blocks_in_team(std::int64_t total, std::int64_t block, ScratchOf&& scratch_of, F&& fn) {
  if (total <= 0) return;
  const std::int64_t nblocks = (total + block - 1) / block;
#ifdef _OPENMP
  // One thread: no team (libgomp allocates a team of one on every region). Eigen does not
  // thread a product with one thread allowed either.
  if (omp_get_max_threads() == 1) {
#endif
    auto&& scratch = scratch_of(0);
    for (std::int64_t b = 0; b < nblocks; ++b) {
      const std::int64_t begin = b * block;
      fn(scratch, begin, begin + block < total ? begin + block : total);
    }
    return;
#ifdef _OPENMP
  }
  std::exception_ptr error;
  std::int64_t error_block = nblocks;
#pragma omp parallel
  {
#ifdef _OPENMP
    auto&& scratch = scratch_of(omp_get_thread_num());  // a reference, or a thread's own object
#else
    auto&& scratch = scratch_of(0);
#endif
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
#endif
}

/// Calls fn(scratch, begin, end) for consecutive blocks [begin, end) of [0, total) of size
/// `block`, with one default-constructed Scratch per thread. A single block runs on the
/// calling thread (opening a team costs more than a small batch's work). An exception thrown
/// by fn is rethrown (the one from the lowest block).
template <class Scratch, class F>
void parallel_blocks_with(std::int64_t total, std::int64_t block, F&& fn) {
  if (total <= 0) return;
  if (total <= block) {
    Scratch scratch{};
    fn(scratch, std::int64_t{0}, total);
    return;
  }
  blocks_in_team(
      total, block, [](int) { return Scratch{}; }, fn);
}

/// As parallel_blocks_with, each thread's scratch taken from `pool` (grown to the thread
/// count; kept by the caller, so its buffers are reused from call to call without allocating).
template <class Scratch, class F>
void parallel_blocks_pooled(std::int64_t total, std::int64_t block, std::vector<Scratch>& pool,
                            F&& fn) {
  if (total <= 0) return;
#ifdef _OPENMP
  const std::size_t threads = total <= block ? 1 : static_cast<std::size_t>(omp_get_max_threads());
#else
  const std::size_t threads = 1;
#endif
  if (pool.size() < threads) pool.resize(threads);
  if (total <= block) {
    fn(pool[0], std::int64_t{0}, total);
    return;
  }
  blocks_in_team(
      total, block, [&](int t) -> Scratch& { return pool[static_cast<std::size_t>(t)]; }, fn);
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
