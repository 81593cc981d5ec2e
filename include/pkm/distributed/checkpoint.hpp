// pkm/distributed/checkpoint.hpp — saving and loading a memory-parallel layer: each process
// its own file of its columns (pkm/io/shards.hpp describes the format and joins or splits
// such files), or each process its columns out of one whole checkpoint. Needs pkm::io.
#pragma once

#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "pkm/distributed/memory_parallel_layer.hpp"
#include "pkm/io/checkpoint.hpp"
#include "pkm/io/shards.hpp"

namespace pkm::distributed {

/// "prefix-shard1-of-3.safetensors": the file name process `rank` of `ranks` saves to.
inline std::string shard_path(const std::string& prefix, int rank, int ranks) {
  return prefix + "-shard" + std::to_string(rank) + "-of-" + std::to_string(ranks) + ".safetensors";
}

namespace detail {
/// How a process names the file it will write, for telling whether two processes would write
/// the same file: its absolute path with the symbolic links of the existing part resolved,
/// and, where the file exists, its host, device and inode (hard links, other spellings).
struct FileIdentity {
  std::string path, inode;
};
inline FileIdentity file_identity(const std::string& path) {
  FileIdentity id;
  id.path = std::filesystem::weakly_canonical(std::filesystem::absolute(path)).string();
  struct stat st {};
  if (::stat(path.c_str(), &st) == 0) {
    char host[256] = {};
    ::gethostname(host, sizeof host - 1);
    id.inode =
        std::string(host) + ":" + std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino);
  }
  return id;
}
}  // namespace detail

/// Writes this process's part of the layer to `path`: the dense tensors, its columns as
/// values.weight and the shard metadata, plus `extra_metadata`. Atomic per file. Collective:
/// a failure on any process throws on every process.
///
/// Every process must name a file of its own (shard_path(prefix, rank, size) makes one): two
/// processes naming the same file — the same path, or the same file through a link — are
/// refused on every process before any file is written, since one would overwrite the
/// other's columns. This holds on node-local disks too, where the same path on two hosts
/// would be two files: pkm cannot tell a local disk from a shared one, so give each process
/// its own name there as well (and copy the shards to one place to gather them).
template <class Scalar, class TableT>
void save_shard(const std::string& path, const MemoryParallelLayer<Scalar, TableT>& layer,
                const std::map<std::string, std::string>& extra_metadata = {}) {
  const char* who = "pkm::distributed::save_shard";
  const Group& group = layer.group();
  detail::FileIdentity mine;
  group.collectively(who, Op::checkpoint, [&] {
    if (path.empty()) throw std::invalid_argument(std::string(who) + ": path is empty");
    mine = detail::file_identity(path);
  });
  const std::vector<std::string> paths = group.allgather_string(who, mine.path);
  const std::vector<std::string> inodes = group.allgather_string(who, mine.inode);
  group.collectively(who, Op::verify, [&] {
    for (int q = 0; q < group.size(); ++q) {
      const auto u = static_cast<std::size_t>(q);
      if (q == group.rank() ||
          (paths[u] != mine.path && (mine.inode.empty() || inodes[u] != mine.inode)))
        continue;
      throw std::invalid_argument(
          std::string(who) + ": processes " + std::to_string(std::min(q, group.rank())) + " and " +
          std::to_string(std::max(q, group.rank())) + " would both write '" + mine.path +
          "'; expected a file of its own for every process (shard_path(prefix, rank, size)); "
          "nothing was written");
    }
  });
  group.collectively(who, Op::checkpoint_write, [&] {
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
MemoryParallelLayer<Scalar, TableT> load_shard(const Group& group, const std::string& path,
                                               const ColumnShards& shards,
                                               const io::LoadOptions& opt = {}) {
  const char* who = "pkm::distributed::load_shard";
  LayerParameters<Scalar> params;
  ValueTable<TableT> table;
  group.collectively(who, Op::checkpoint, [&] {
    const io::SafetensorsFile f(path);
    const MemoryConfig c = io::infer_config(f, opt);
    if (shards.v_dim() != c.v_dim || shards.ranks() != group.size()) {
      io::detail::bad_checkpoint(
          f, "has v_dim = " + std::to_string(c.v_dim) + "; the split " + shards.to_string() +
                 " (for " + std::to_string(group.size()) + " processes) does not fit it");
    }
    const int r = group.rank();
    const Index c0 = shards.begin(r), w = shards.width(r), rows = c.slots();
    const std::string name = opt.prefix + "values.weight";
    table = ValueTable<TableT>(rows, w);
    if (const auto range = io::detail::shard_range(f)) {
      if (range->begin != c0 || range->end != c0 + w) {
        io::detail::bad_checkpoint(f, "holds columns [" + std::to_string(range->begin) + ", " +
                                          std::to_string(range->end) + "); process " +
                                          std::to_string(r) + " needs [" + std::to_string(c0) +
                                          ", " + std::to_string(c0 + w) + ")");
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
                                        " holds a non-finite value in columns [" +
                                        std::to_string(c0) + ", " + std::to_string(c0 + w) + ")");
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
