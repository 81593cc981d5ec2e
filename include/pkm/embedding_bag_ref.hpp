// pkm/embedding_bag_ref.hpp — the reference of pkm/embedding_bag.hpp, as FBGEMM keeps its
// *_ref functions: the obviously correct gather the tests and the benchmarks compare the fast
// one with. Not part of pkm/pkm.hpp; include it where you compare.
#pragma once

#include "pkm/embedding_bag.hpp"

namespace pkm {

/// The obviously-correct version: row by row, element by element, no threads, no prefetch.
template <class T, class S = detail::accumulator_t<T>>
void embedding_bag_naive(const ValueTable<T>& table, const ConstIndexRef& indices,
                         const ConstMatrixRef<detail::no_deduce<S>>& weights,
                         MatrixRef<detail::no_deduce<S>> out) {
  detail::check_bag_args("pkm::embedding_bag_naive", table, indices, weights, "out", out.rows(),
                         out.cols());
  const Index dim = table.dim();
  for (Index b = 0; b < indices.rows(); ++b) {
    for (Index d = 0; d < dim; ++d) out(b, d) = S(0);
    for (Index l = 0; l < indices.cols(); ++l) {
      const T* row = table.row(indices(b, l));
      for (Index d = 0; d < dim; ++d) out(b, d) += weights(b, l) * static_cast<S>(row[d]);
    }
  }
}

}  // namespace pkm
