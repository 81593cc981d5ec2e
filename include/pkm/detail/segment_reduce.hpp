// pkm/detail/segment_reduce.hpp — the deterministic sparse reduction behind every sparse
// gradient in pkm: contributions (row, source, coef) are grouped by row (a stable sort, so
// each row keeps the order the contributions were made in) and each row's sum
//     out[row] = sum over its contributions of coef * source_vector(source, row)
// is formed once, by one thread. No atomics; the same bits with any thread count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "pkm/detail/parallel.hpp"
#include "pkm/types.hpp"

namespace pkm::detail {

template <class S>
struct RowContribution {
  std::int64_t row;     ///< target row
  std::int64_t source;  ///< which source vector (e.g. the token)
  S coef;               ///< its weight
};

/// Sorts `items` by row (stable) and writes the unique rows and their reduced vectors.
/// `source(source_id, row)` returns a pointer to `dim` values of type convertible to S.
template <class S, class SourceFn>
void segment_reduce(std::vector<RowContribution<S>>& items, Index dim, SourceFn&& source,
                    std::vector<std::int64_t>& out_rows, RowMatrix<S>& out_values) {
  std::stable_sort(items.begin(), items.end(),
                   [](const RowContribution<S>& a, const RowContribution<S>& b) {
                     return a.row < b.row;
                   });
  std::vector<std::size_t> starts;
  out_rows.clear();
  for (std::size_t t = 0; t < items.size(); ++t) {
    if (t == 0 || items[t].row != items[t - 1].row) {
      starts.push_back(t);
      out_rows.push_back(items[t].row);
    }
  }
  starts.push_back(items.size());
  const Index nrows = static_cast<Index>(out_rows.size());
  out_values.resize(nrows, dim);
  parallel_blocks(nrows, 16, [&](Index begin, Index end) {
    for (Index u = begin; u < end; ++u) {
      S* out = out_values.row(u).data();
      std::fill(out, out + dim, S(0));
      for (std::size_t t = starts[u]; t < starts[u + 1]; ++t) {
        const auto* src = source(items[t].source, items[t].row);
        const S c = items[t].coef;
        for (Index d = 0; d < dim; ++d) out[d] += c * static_cast<S>(src[d]);
      }
    }
  });
}

}  // namespace pkm::detail
