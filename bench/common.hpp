// What pkm_bench's files share: the benchmark layer's shape, and the streaming read that
// measures the machine's memory limit (outside pkm: Eigen's vectorised sum over the threads).
#pragma once

#include <pkm/config.hpp>
#include <pkm/types.hpp>
#include <pkm/value_table.hpp>

#include <Eigen/Core>

#include <algorithm>

namespace pkmbench {

using pkm::Index;

/// The quickstart's layer (and the benchmarks'): d 1024, 4 heads, 512^2 slots, knn 32, k_dim
/// 512, v_dim 1024 — a 1 GiB fp32 table.
inline pkm::MemoryConfig quickstart_shape() {
  pkm::MemoryConfig c;
  c.input_dim = 1024;
  c.heads = 4;
  c.n_keys = 512;
  c.k_dim = 512;
  c.knn = 32;
  c.v_dim = 1024;
  c.output_dim = 1024;
  return c;
}

/// Fills a table with small distinct values, fast (the benchmarks do not depend on them).
template <class T>
inline void fill(pkm::ValueTable<T>& t) {
  const Index dim = t.dim();
#pragma omp parallel for schedule(static)
  for (Index r = 0; r < t.rows(); ++r)
    for (Index d = 0; d < dim; ++d) t.row(r)[d] = static_cast<T>(float((r * 31 + d) % 97) * 1e-3f);
}

/// The sum of n floats read once, split over the threads in 256 KiB chunks, each summed with
/// Eigen's vectorised reduction (several independent accumulators, so the adds never wait).
inline float stream_sum(const float* p, pkm::Index n) {
  constexpr pkm::Index kChunk = pkm::Index(1) << 16;
  float total = 0;
#pragma omp parallel for reduction(+ : total) schedule(static)
  for (pkm::Index i = 0; i < n; i += kChunk)
    total += Eigen::Map<const Eigen::VectorXf>(p + i, std::min(kChunk, n - i)).sum();
  return total;
}

}  // namespace pkmbench
