// pkm/io/shards.hpp — checkpoints of a memory-parallel layer (pkm/distributed): each process
// saves its columns of the value table under the reference name "values.weight", with the
// column range in __metadata__ (pkm_shard_column_begin / _end / _v_dim) and full copies of
// the dense tensors. gather_shards joins such files into one checkpoint that the
// single-process load_layer (and PyTorch) loads; split_checkpoint cuts one into shards.
// Neither needs MPI (the pkm_shards tool wraps both).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "pkm/io/checkpoint.hpp"
#include "pkm/io/paths.hpp"
#include "pkm/io/safetensors.hpp"

namespace pkm::io {

namespace detail {
/// Calls fn(T{}) with T the C++ type of a float dtype.
template <class F>
void with_float_type(const SafetensorsFile& f, const std::string& name, Dtype d, F&& fn) {
  switch (d) {
    case Dtype::f32:
      fn(float{});
      return;
    case Dtype::f64:
      fn(double{});
      return;
    case Dtype::bf16:
      fn(bf16{});
      return;
    case Dtype::f16:
      fn(fp16{});
      return;
    default:
      bad_checkpoint(
          f, "tensor '" + name + "' has dtype " + dtype_name(d) + "; expected a float dtype");
  }
}

/// A tensor's bytes in its own dtype, for copying between files unchanged.
struct RawTensor {
  Dtype dtype = Dtype::f32;
  std::vector<std::int64_t> shape;
  std::vector<std::uint8_t> bytes;
};
inline RawTensor read_raw(const SafetensorsFile& f, const std::string& name) {
  const TensorInfo& t = f.info(name);
  RawTensor r;
  r.dtype = t.dtype;
  r.shape = t.shape;
  const auto n = static_cast<std::size_t>(t.numel());
  r.bytes.resize(n * dtype_size(t.dtype));
  with_float_type(f, name, t.dtype, [&](auto zero) {
    using T = decltype(zero);
    f.read(name, reinterpret_cast<T*>(r.bytes.data()), n);
  });
  return r;
}
inline void add_raw(SafetensorsWriter& w, const std::string& name, const RawTensor& r) {
  w.add(name, r.dtype, r.shape, r.bytes.data());
}

/// The dense tensors' names present in a checkpoint of config c.
inline std::vector<std::string> dense_names(const MemoryConfig& c) {
  std::vector<std::string> names;
  for (int t = 0; t < kNumTensors; ++t) {
    if (tensor_shape(c, Tensor(t)).present) names.push_back(tensor_name(Tensor(t)));
  }
  return names;
}

inline void copy_metadata(SafetensorsWriter& w, const SafetensorsFile& f) {
  for (const auto& [k, v] : f.metadata()) {
    if (k != kMetaShardBegin && k != kMetaShardEnd && k != kMetaShardVDim) w.set_metadata(k, v);
  }
}
}  // namespace detail

/// Joins the column shards in `paths` (any order; each saved by pkm::distributed::save_shard
/// or split_checkpoint) into one checkpoint at `out` that load_layer loads. Checks, before
/// writing anything, that the shards have the same config, table rows and dtype, that their
/// columns tile [0, v_dim) exactly, and that their dense tensors are bitwise equal (as the
/// processes of one group hold them); throws std::invalid_argument naming the file otherwise.
/// Holds the whole table in memory once. The write is atomic (SafetensorsWriter::write).
inline void gather_shards(const std::vector<std::string>& paths, const std::string& out) {
  const char* who = "pkm::io::gather_shards";
  if (paths.empty()) throw std::invalid_argument(std::string(who) + ": no shard files given");
  std::vector<NamedPath> inputs;
  for (std::size_t i = 0; i < paths.size(); ++i)
    inputs.push_back({"shard " + std::to_string(i), paths[i]});
  check_outputs(who, {{"the output", out}}, inputs);
  std::vector<SafetensorsFile> files;
  files.reserve(paths.size());
  for (const auto& p : paths) files.emplace_back(p);
  std::vector<std::pair<ShardRange, std::size_t>> ranges;
  MemoryConfig config;
  for (std::size_t i = 0; i < files.size(); ++i) {
    const auto r = detail::shard_range(files[i]);
    if (!r) detail::bad_checkpoint(files[i], "is not a column shard (no pkm_shard_* metadata)");
    const MemoryConfig c = infer_config(files[i]);
    if (i == 0) {
      config = c;
    } else if (c != config) {
      detail::bad_checkpoint(files[i], "has another layer config than '" + paths[0] + "'");
    }
    if (files[i].info("values.weight").dtype != files[0].info("values.weight").dtype) {
      detail::bad_checkpoint(files[i],
                             "stores values.weight as another dtype than '" + paths[0] + "'");
    }
    ranges.push_back({*r, i});
  }
  std::sort(ranges.begin(), ranges.end(),
            [](const auto& a, const auto& b) { return a.first.begin < b.first.begin; });
  Index next = 0;
  for (const auto& [r, i] : ranges) {
    if (r.begin != next) {
      detail::bad_checkpoint(
          files[i],
          "holds columns [" + std::to_string(r.begin) + ", " + std::to_string(r.end) +
              ") but the shards given end at column " + std::to_string(next) +
              " before it: the shards must cover [0, v_dim) once, without gaps or overlaps");
    }
    next = r.end;
  }
  if (next != config.v_dim) {
    throw std::invalid_argument(std::string(who) + ": the shards cover columns [0, " +
                                std::to_string(next) + ") of " + std::to_string(config.v_dim) +
                                "; a shard is missing");
  }
  SafetensorsWriter w;
  detail::copy_metadata(w, files[0]);
  std::vector<detail::RawTensor> dense;
  for (const auto& name : detail::dense_names(config)) {
    dense.push_back(detail::read_raw(files[0], name));
    for (std::size_t i = 1; i < files.size(); ++i) {
      const detail::RawTensor other = detail::read_raw(files[i], name);
      if (other.dtype != dense.back().dtype || other.bytes != dense.back().bytes) {
        detail::bad_checkpoint(
            files[i], "tensor '" + name + "' differs from '" + paths[0] +
                          "'s: the shards must come from one layer (the same dense parameters)");
      }
    }
  }
  const auto names = detail::dense_names(config);
  for (std::size_t k = 0; k < names.size(); ++k) detail::add_raw(w, names[k], dense[k]);
  const Dtype dtype = files[0].info("values.weight").dtype;
  const std::size_t es = dtype_size(dtype);
  const Index rows = config.slots(), v_dim = config.v_dim;
  std::vector<std::uint8_t> table(static_cast<std::size_t>(pkm::detail::checked_mul(
      who, "the table's bytes", pkm::detail::checked_mul(who, "the table's elements", rows, v_dim),
      Index(es))));
  for (const auto& [r, i] : ranges) {
    const detail::RawTensor part = detail::read_raw(files[i], "values.weight");
    const std::size_t row_bytes = static_cast<std::size_t>(r.width()) * es;
    for (Index row = 0; row < rows; ++row) {
      std::memcpy(table.data() + (static_cast<std::size_t>(row * v_dim + r.begin)) * es,
                  part.bytes.data() + static_cast<std::size_t>(row) * row_bytes, row_bytes);
    }
  }
  w.add("values.weight", dtype, {rows, v_dim}, table.data());
  w.write(out);
}

/// Cuts the checkpoint at `path` (a whole layer) into one file per column range
/// [offsets[r], offsets[r + 1]) at out_paths[r], each with every dense tensor and the shard
/// metadata: what process r of a memory-parallel group with that split loads. offsets must
/// start at 0, increase strictly and end at v_dim.
inline void split_checkpoint(const std::string& path, const std::vector<Index>& offsets,
                             const std::vector<std::string>& out_paths) {
  const char* who = "pkm::io::split_checkpoint";
  std::vector<NamedPath> outputs;
  for (std::size_t i = 0; i < out_paths.size(); ++i)
    outputs.push_back({"output " + std::to_string(i), out_paths[i]});
  check_outputs(who, outputs, {{"the checkpoint", path}});
  const SafetensorsFile f(path);
  detail::refuse_shard(f);
  const MemoryConfig config = infer_config(f);
  if (offsets.size() < 2 || offsets.front() != 0 || offsets.back() != config.v_dim ||
      out_paths.size() + 1 != offsets.size()) {
    throw std::invalid_argument(std::string(who) + ": " + std::to_string(offsets.size()) +
                                " offsets for " + std::to_string(out_paths.size()) +
                                " output files; expected P + 1 offsets from 0 to v_dim = " +
                                std::to_string(config.v_dim) + " for P files");
  }
  for (std::size_t r = 1; r < offsets.size(); ++r) {
    if (offsets[r] <= offsets[r - 1]) {
      throw std::invalid_argument(std::string(who) + ": offsets[" + std::to_string(r) +
                                  "] = " + std::to_string(offsets[r]) + " after " +
                                  std::to_string(offsets[r - 1]) +
                                  "; expected strictly increasing offsets");
    }
  }
  std::vector<detail::RawTensor> dense;
  const auto names = detail::dense_names(config);
  for (const auto& name : names) dense.push_back(detail::read_raw(f, name));
  const detail::RawTensor table = detail::read_raw(f, "values.weight");
  const std::size_t es = dtype_size(table.dtype);
  const Index rows = config.slots(), v_dim = config.v_dim;
  for (std::size_t r = 0; r + 1 < offsets.size(); ++r) {
    const Index c0 = offsets[r], width = offsets[r + 1] - offsets[r];
    std::vector<std::uint8_t> part(static_cast<std::size_t>(rows * width) * es);
    for (Index row = 0; row < rows; ++row) {
      std::memcpy(part.data() + static_cast<std::size_t>(row * width) * es,
                  table.bytes.data() + static_cast<std::size_t>(row * v_dim + c0) * es,
                  static_cast<std::size_t>(width) * es);
    }
    SafetensorsWriter w;
    detail::copy_metadata(w, f);
    for (std::size_t k = 0; k < names.size(); ++k) detail::add_raw(w, names[k], dense[k]);
    w.add("values.weight", table.dtype, {rows, width}, part.data());
    w.set_metadata(kMetaShardBegin, std::to_string(c0));
    w.set_metadata(kMetaShardEnd, std::to_string(c0 + width));
    w.set_metadata(kMetaShardVDim, std::to_string(v_dim));
    w.write(out_paths[r]);
  }
}

}  // namespace pkm::io
