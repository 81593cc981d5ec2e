// pkm/distributed/checkpoint.hpp — saving and loading a memory-parallel layer: each process
// its own file of its columns (pkm/io/shards.hpp describes the format and joins or splits
// such files), or each process its columns out of one whole checkpoint. Needs pkm::io.
#pragma once

#include <map>
#include <string>

#include "pkm/distributed/memory_parallel_layer.hpp"
#include "pkm/io/checkpoint.hpp"
#include "pkm/io/shards.hpp"

namespace pkm::distributed {

/// "prefix-shard1-of-3.safetensors": the file name process `rank` of `ranks` saves to.
inline std::string shard_path(const std::string& prefix, int rank, int ranks) {
  return prefix + "-shard" + std::to_string(rank) + "-of-" + std::to_string(ranks) + ".safetensors";
}

/// Writes this process's part of the layer to `path` (each process its own path, e.g.
/// shard_path(prefix, rank, size)): the dense tensors, its columns as values.weight and the
/// shard metadata, plus `extra_metadata`. Atomic per file. Collective: a failure on any
/// process throws on every process.
template <class Scalar, class TableT>
void save_shard(const std::string& path, const MemoryParallelLayer<Scalar, TableT>& layer,
                const std::map<std::string, std::string>& extra_metadata = {}) {
  const char* who = "pkm::distributed::save_shard";
  layer.group().collectively(who, Op::checkpoint, [&] {
    io::SafetensorsWriter w;
    for (const auto& [k, v] : extra_metadata) w.set_metadata(k, v);
    io::detail::add_parts(w, layer.params(), layer.values(), "");
    w.set_metadata(io::kMetaShardBegin, std::to_string(layer.column_begin()));
    w.set_metadata(io::kMetaShardEnd, std::to_string(layer.column_end()));
    w.set_metadata(io::kMetaShardVDim, std::to_string(layer.config().v_dim));
    w.write(path);
  });
}

/// Loads this process's part of a memory-parallel layer split as `shards` from `path`:
/// either this process's shard file (its columns must be this process's) or a whole
/// checkpoint, of which only this process's columns are kept (read in chunks; the whole
/// table is never held). Checks values as load_layer does. Collective: every process passes
/// its own path (or the same whole file); an error on any throws on every process.
template <class Scalar, class TableT = Scalar>
MemoryParallelLayer<Scalar, TableT> load_shard(const Group& group, const std::string& path, const ColumnShards& shards,
                                               const io::LoadOptions& opt = {}) {
  const char* who = "pkm::distributed::load_shard";
  LayerParameters<Scalar> params;
  ValueTable<TableT> table;
  group.collectively(who, Op::checkpoint, [&] {
    const io::SafetensorsFile f(path);
    const MemoryConfig c = io::infer_config(f, opt);
    if (shards.v_dim() != c.v_dim || shards.ranks() != group.size()) {
      io::detail::bad_checkpoint(f, "has v_dim = " + std::to_string(c.v_dim) + "; the split " + shards.to_string() +
                                        " (for " + std::to_string(group.size()) + " processes) does not fit it");
    }
    const int r = group.rank();
    const Index c0 = shards.begin(r), w = shards.width(r), rows = c.slots();
    const std::string name = opt.prefix + "values.weight";
    table = ValueTable<TableT>(rows, w);
    if (const auto range = io::detail::shard_range(f)) {
      if (range->begin != c0 || range->end != c0 + w) {
        io::detail::bad_checkpoint(f, "holds columns [" + std::to_string(range->begin) + ", " + std::to_string(range->end) +
                                          "); process " + std::to_string(r) + " needs [" + std::to_string(c0) + ", " +
                                          std::to_string(c0 + w) + ")");
      }
      f.read(name, table.data(), static_cast<std::size_t>(rows * w));
    } else {
      const Index v_dim = c.v_dim;
      f.visit<TableT>(name, [&](const TableT* v, std::size_t first, std::size_t n) {
        for (std::size_t i = 0; i < n; ++i) {
          const Index e = static_cast<Index>(first + i), row = e / v_dim, col = e % v_dim;
          if (col >= c0 && col < c0 + w) table.row(row)[col - c0] = v[i];
        }
      });
    }
    if (const Index bad = first_non_finite_row(table); bad >= 0) {
      io::detail::bad_checkpoint(f, "tensor '" + name + "' row " + std::to_string(bad) +
                                        " holds a non-finite value in columns [" + std::to_string(c0) + ", " +
                                        std::to_string(c0 + w) + ")");
    }
    params = io::load_parameters<Scalar>(f, c, opt.prefix);
    try {
      check_parameters_finite(who, params);
    } catch (const std::runtime_error& e) {
      io::detail::bad_checkpoint(f, e.what());
    }
  });
  return MemoryParallelLayer<Scalar, TableT>(group, std::move(params), std::move(table), shards);
}

}  // namespace pkm::distributed
