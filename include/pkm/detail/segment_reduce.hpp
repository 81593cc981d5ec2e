// pkm/detail/segment_reduce.hpp — the deterministic sparse reduction behind every sparse
// gradient in pkm: contributions (row, source, coef) are grouped by row (a stable sort, so
// each row keeps the order the contributions were made in) and each row's sum
//     out[row] = sum over its contributions of coef * source_vector(source, row)
// is formed once, by one thread. No atomics; the same bits with any thread count.
//
// Grouping (group_by_row) and reducing one row (reduce_segment) are separate so that a caller
// can reduce a row into a scratch vector and apply it at once (the fused value update, the
// sub-key gradient) instead of storing every reduced row (reduce_segments).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "pkm/detail/aligned_buffer.hpp"
#include "pkm/detail/parallel.hpp"
#include "pkm/types.hpp"

namespace pkm::detail {

template <class S>
struct RowContribution {
  std::int64_t row;     ///< target row
  std::int64_t source;  ///< which source vector (e.g. the token)
  S coef;               ///< its weight
};

/// Contributions grouped by row: segment u covers items[starts[u], starts[u + 1]) and
/// targets rows[u]; rows are sorted and unique.
struct RowSegments {
  std::vector<std::int64_t> rows;
  std::vector<std::size_t> starts;
  Index size() const { return static_cast<Index>(rows.size()); }
};

/// Buffers of group_by_row, kept between calls so that grouping allocates nothing once warm.
template <class S>
struct GroupScratch {
  std::vector<RowContribution<S>> tmp;
  std::vector<std::size_t> counts;
};

/// Sorts `items` by row, stably (contributions to one row keep their order), and writes its
/// segments to `seg`. Every row id must lie in [0, row_count). An LSD radix sort with digits
/// of at most 11 bits: linear in the number of items, no comparisons, no allocation once the
/// scratch and `seg` have grown to size.
template <class S>
void group_by_row(std::vector<RowContribution<S>>& items, std::int64_t row_count,
                  GroupScratch<S>& scratch, RowSegments& seg) {
  int bits = 0;
  while (bits < 63 && (std::int64_t(1) << bits) < row_count) ++bits;
  const int passes = bits == 0 ? 0 : (bits + 10) / 11;
  const int digit = passes == 0 ? 0 : (bits + passes - 1) / passes;
  const std::size_t buckets = std::size_t(1) << digit;
  scratch.tmp.resize(items.size());
  for (int p = 0; p < passes; ++p) {
    const int shift = p * digit;
    scratch.counts.assign(buckets + 1, 0);
    for (const auto& it : items)
      ++scratch.counts[((std::uint64_t(it.row) >> shift) & (buckets - 1)) + 1];
    for (std::size_t d = 1; d <= buckets; ++d) scratch.counts[d] += scratch.counts[d - 1];
    for (const auto& it : items)
      scratch.tmp[scratch.counts[(std::uint64_t(it.row) >> shift) & (buckets - 1)]++] = it;
    items.swap(scratch.tmp);
  }
  seg.rows.clear();
  seg.starts.clear();
  for (std::size_t t = 0; t < items.size(); ++t) {
    if (t == 0 || items[t].row != items[t - 1].row) {
      seg.starts.push_back(t);
      seg.rows.push_back(items[t].row);
    }
  }
  seg.starts.push_back(items.size());
}

/// out[0, dim) = the sum of segment u, its contributions added in order.
/// `source(source_id, row)` returns a pointer to `dim` values of type convertible to S.
template <class S, class SourceFn>
void reduce_segment(const std::vector<RowContribution<S>>& items, const RowSegments& seg, Index u,
                    Index dim, SourceFn& source, S* out) {
  std::fill(out, out + dim, S(0));
  for (std::size_t t = seg.starts[u]; t < seg.starts[u + 1]; ++t) {
    const auto* src = source(items[t].source, items[t].row);
    const S c = items[t].coef;
    for (Index d = 0; d < dim; ++d) out[d] += c * static_cast<S>(src[d]);
  }
}

/// Rows per parallel block when reducing segments.
inline constexpr Index kSegmentBlock = 16;

/// Reduces every segment of grouped `items` into out_values (one row per segment).
template <class S, class SourceFn>
void reduce_segments(const std::vector<RowContribution<S>>& items, const RowSegments& seg,
                     Index dim, SourceFn&& source, RowMatrix<S>& out_values) {
  const bool fresh = out_values.rows() != seg.size() || out_values.cols() != dim;
  out_values.resize(seg.size(), dim);
  // A new gradient of hundreds of MiB is written once: huge pages spare most page faults.
  if (fresh)
    advise_huge_pages(out_values.data(), static_cast<std::size_t>(out_values.size()) * sizeof(S));
  parallel_blocks(seg.size(), kSegmentBlock, [&](Index begin, Index end) {
    for (Index u = begin; u < end; ++u)
      reduce_segment(items, seg, u, dim, source, out_values.row(u).data());
  });
}

}  // namespace pkm::detail
