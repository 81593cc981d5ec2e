// pkm/distributed/column_shards.hpp — how a value table's v_dim columns are split over the P
// processes of a memory-parallel group: process r holds every row's columns
// [begin(r), end(r)). Any split with at least one column per process is allowed, even or not
// (the reference implementation needs power-of-two, equal widths). No MPI in here.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "pkm/types.hpp"

namespace pkm::distributed {

class ColumnShards {
 public:
  ColumnShards() = default;

  /// v_dim columns over `ranks` processes in widths that differ by at most one, the wider
  /// ones first (1000 over 3: 334, 333, 333).
  static ColumnShards even(Index v_dim, int ranks) {
    if (ranks < 1 || v_dim < ranks) {
      throw std::invalid_argument(
          "pkm::distributed::ColumnShards::even: " + std::to_string(v_dim) + " columns over " +
          std::to_string(ranks) +
          " processes; expected ranks >= 1 and at least one column per process");
    }
    std::vector<Index> offsets(static_cast<std::size_t>(ranks) + 1, 0);
    const Index base = v_dim / ranks, extra = v_dim % ranks;
    for (int r = 0; r < ranks; ++r) offsets[r + 1] = offsets[r] + base + (r < extra ? 1 : 0);
    return from_offsets(std::move(offsets));
  }

  /// The split with process r holding [offsets[r], offsets[r + 1]): offsets[0] = 0, strictly
  /// increasing, offsets.back() = v_dim.
  static ColumnShards from_offsets(std::vector<Index> offsets) {
    const char* who = "pkm::distributed::ColumnShards::from_offsets";
    if (offsets.size() < 2 || offsets.front() != 0) {
      throw std::invalid_argument(std::string(who) + ": offsets has " +
                                  std::to_string(offsets.size()) + " entries starting at " +
                                  (offsets.empty() ? "nothing" : std::to_string(offsets[0])) +
                                  "; expected P + 1 >= 2 entries starting at 0");
    }
    for (std::size_t r = 1; r < offsets.size(); ++r) {
      if (offsets[r] <= offsets[r - 1]) {
        throw std::invalid_argument(
            std::string(who) + ": offsets[" + std::to_string(r) +
            "] = " + std::to_string(offsets[r]) + " after " + std::to_string(offsets[r - 1]) +
            "; expected strictly increasing offsets (at least one column per process)");
      }
    }
    ColumnShards s;
    s.offsets_ = std::move(offsets);
    return s;
  }

  int ranks() const { return static_cast<int>(offsets_.size()) - 1; }
  Index v_dim() const { return offsets_.empty() ? 0 : offsets_.back(); }
  Index begin(int r) const { return offsets_.at(static_cast<std::size_t>(r)); }
  Index end(int r) const { return offsets_.at(static_cast<std::size_t>(r) + 1); }
  Index width(int r) const { return end(r) - begin(r); }
  const std::vector<Index>& offsets() const { return offsets_; }

  /// "[0, 334) [334, 667) [667, 1000)"
  std::string to_string() const {
    std::string s;
    for (int r = 0; r < ranks(); ++r) {
      s += (r ? " [" : "[") + std::to_string(begin(r)) + ", " + std::to_string(end(r)) + ")";
    }
    return s;
  }

  friend bool operator==(const ColumnShards& a, const ColumnShards& b) {
    return a.offsets_ == b.offsets_;
  }
  friend bool operator!=(const ColumnShards& a, const ColumnShards& b) { return !(a == b); }

 private:
  std::vector<Index> offsets_;
};

}  // namespace pkm::distributed
