// pkm/io/slot_statistics.hpp — slot statistics (pkm/slot_statistics.hpp) in a checkpoint,
// next to the layer and its optimizers, under a prefix of their own.
#pragma once

#include <string>
#include <utility>

#include "pkm/io/optimizer_state.hpp"
#include "pkm/io/safetensors.hpp"
#include "pkm/slot_statistics.hpp"

namespace pkm::io {

/// Adds the statistics' tensors, named prefix + "documents", "count", "document_count" and
/// (with mass) "mass", to `w` (kept by pointer until w.write()).
inline void add_slot_statistics(SafetensorsWriter& w, SlotStatistics& stats,
                                const std::string& prefix) {
  add_optimizer_state(w, stats, prefix);
}

/// Loads statistics saved by add_slot_statistics into `stats`, which gives the slot count and
/// whether mass is expected. Every tensor is checked (present, shape, dtype, counts >= 0,
/// mass finite and >= 0) and so is their agreement (SlotStatistics::check_consistent) before
/// `stats` changes: on error (std::invalid_argument naming the tensor or slot) it is unchanged.
inline void load_slot_statistics(const SafetensorsFile& f, SlotStatistics& stats,
                                 const std::string& prefix) {
  SlotStatistics loaded(stats.slots(), stats.tracks_mass());
  load_optimizer_state(f, loaded, prefix);
  loaded.check_consistent("pkm::io::load_slot_statistics");
  stats = std::move(loaded);
}

}  // namespace pkm::io
