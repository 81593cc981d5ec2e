// pkm/distributed/slot_statistics.hpp — slot statistics (pkm/slot_statistics.hpp) summed over
// a group of processes, each of which counted its own batches.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "pkm/distributed/group.hpp"
#include "pkm/slot_statistics.hpp"

namespace pkm::distributed {

/// Collective: `stats` on every process becomes the sum of every process's statistics
/// (counts, document counts, documents and mass, each added in process order: the same bits
/// on every process and every run), as merge() would make them. All processes must hold
/// statistics of the same slot count and mass setting, else every process throws
/// std::invalid_argument; where the group's read or document count would overflow a 64-bit
/// counter, every process throws merge()'s std::runtime_error. On error nothing changes.
inline void sum_slot_statistics(const Group& group, SlotStatistics& stats) {
  const char* who = "pkm::distributed::sum_slot_statistics";
  group.collectively(who, Op::sum, [&] {
    if (stats.slots() < 1)
      throw std::invalid_argument(std::string(who) + ": the statistics were default-constructed");
  });
  group.require_same(who, "the statistics' slot count and mass setting",
                     static_cast<std::uint64_t>(stats.slots()) * 2 + (stats.tracks_mass() ? 1 : 0));
  // Every slot's count is at most its process's total and every document count at most its
  // documents: where the group's totals fit, every sum below does. The same check on every
  // process, from the same numbers.
  const std::vector<Index> totals = group.allgather_count(who, stats.total_reads());
  const std::vector<Index> documents = group.allgather_count(who, stats.documents());
  group.collectively(who, Op::result, [&] {
    std::int64_t t = 0, d = 0;
    for (std::size_t q = 0; q < totals.size(); ++q) {
      t = pkm::detail::counter_add(who, "the read count", t, totals[q]);
      d = pkm::detail::counter_add(who, "the document count", d, documents[q]);
    }
  });
  SlotStatistics sum = stats;
  std::vector<std::int64_t> ints;
  sum.for_each_state(
      [&](const std::string&, const std::vector<std::int64_t>& shape, auto* data, auto...) {
        using T = std::remove_pointer_t<decltype(data)>;
        if constexpr (std::is_same_v<T, std::int64_t>)
          ints.insert(ints.end(), data, data + shape[0]);
      });
  group.sum_ordered(who, ints.data(), static_cast<Index>(ints.size()));
  std::size_t at = 0;
  sum.for_each_state(
      [&](const std::string&, const std::vector<std::int64_t>& shape, auto* data, auto...) {
        using T = std::remove_pointer_t<decltype(data)>;
        if constexpr (std::is_same_v<T, std::int64_t>) {
          for (std::int64_t i = 0; i < shape[0]; ++i) data[i] = ints[at++];
        } else {
          group.sum_ordered(who, data, static_cast<Index>(shape[0]));
        }
      });
  group.collectively(who, Op::verify, [&] { sum.check_consistent(who); });
  stats = std::move(sum);
}

}  // namespace pkm::distributed
