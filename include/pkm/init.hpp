// pkm/init.hpp — the reference initialisation, reproducible from a seed on any thread count:
// keys U(+-1/sqrt(k_dim)); values N(0, v_dim^-1/2); Wq xavier-uniform; W1, W2
// N(0, output_dim^-1/2); wg N(0, input_dim^-1/2); biases 0. Across builds the table's values
// agree to rounding: a build whose compiler fuses multiply-adds (FMA, e.g. -march=native)
// gives other last bits than one that does not (measured: -O2 vs -O3 -mavx2 -mfma differ,
// -mavx2 -mfma and AVX-512 agree).
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "pkm/detail/parallel.hpp"
#include "pkm/detail/random.hpp"
#include "pkm/parameters.hpp"
#include "pkm/value_table.hpp"

namespace pkm {

/// Stream id of the value table's random numbers (the dense tensors use their Tensor id).
inline constexpr std::uint64_t kValueStream = 1000;

/// Fills every present tensor of `p` as the reference module initialises it.
template <class Scalar>
void init_parameters(LayerParameters<Scalar>& p, std::uint64_t seed) {
  const MemoryConfig& c = p.config();
  p.for_each([&](Tensor t, MatrixMap<Scalar> m) {
    const detail::CounterRng rng(seed, static_cast<std::uint64_t>(t));
    const Index n = m.size();
    Scalar* d = m.data();
    auto uniform = [&](double bound) {
      for (Index i = 0; i < n; ++i) d[i] = static_cast<Scalar>(rng.uniform(i, -bound, bound));
    };
    auto normal = [&](double std_dev) {
      for (Index i = 0; i < n; ++i) d[i] = static_cast<Scalar>(std_dev * rng.normal(i));
    };
    switch (t) {
      case Tensor::keys:
        uniform(1.0 / std::sqrt(double(c.k_dim)));
        break;
      case Tensor::query_weight:
        uniform(std::sqrt(6.0 / double(c.input_dim + c.heads * c.k_dim)));
        break;
      case Tensor::swilu_weight:
      case Tensor::value_proj_weight:
        normal(1.0 / std::sqrt(double(c.output_dim)));
        break;
      case Tensor::gate_weight:
        normal(1.0 / std::sqrt(double(c.input_dim)));
        break;
      default:
        m.setZero();
        break;  // biases
    }
  });
}

/// Fills columns [column_begin, column_begin + table.dim()) of a value table `full_dim` wide
/// as init_values fills the whole table: `table` holds those columns of every row (a column
/// shard, pkm/distributed), and gets the same values, bit for bit, as the same columns of
/// the whole table initialised from `seed`.
template <class T>
void init_value_columns(ValueTable<T>& table, std::uint64_t seed, Index full_dim,
                        Index column_begin) {
  if (column_begin < 0 || full_dim < 1 || column_begin > full_dim - table.dim()) {
    throw std::invalid_argument(
        "pkm::init_value_columns: columns [" + std::to_string(column_begin) + ", " +
        std::to_string(column_begin + table.dim()) + ") are not within a table of " +
        std::to_string(full_dim) + " columns");
  }
  const detail::CounterRng rng(seed, kValueStream);
  const Index dim = table.dim();
  const float std_dev = static_cast<float>(1.0 / std::sqrt(double(full_dim)));
  detail::parallel_blocks(table.rows(), 64, [&](Index r0, Index r1) {
    for (Index r = r0; r < r1; ++r) {
      detail::fill_normal(rng, static_cast<std::uint64_t>(r * full_dim + column_begin), dim,
                          std_dev, table.row(r));
    }
  });
}

/// Fills a value table with N(0, dim^-1/2), in parallel; element (r, d) is normal number
/// r * dim + d of the table's stream (detail::fill_normal: float Box-Muller without library
/// calls, vectorised), so the values depend on the seed alone, never on the thread count.
template <class T>
void init_values(ValueTable<T>& table, std::uint64_t seed) {
  init_value_columns(table, seed, table.dim(), 0);
}

}  // namespace pkm
