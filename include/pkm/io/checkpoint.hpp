// pkm/io/checkpoint.hpp — load and save one memory layer as safetensors with the parameter
// names of the reference PyTorch module (HashingMemory), so checkpoints trained there run here
// and pkm's checkpoints load there.
//
// Sizes come from the shapes; which optional tensors are present decides Memory+, projection,
// gating and query bias. What shapes cannot tell — knn, qk-norm and its scale, the score
// activation — comes from the caller (LoadOptions) or else from __metadata__ keys "mem_knn",
// "qk_norm", "qk_norm_scale", "score_activation" (absent: softmax).
#pragma once

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>

#include "pkm/io/mapped_table.hpp"
#include "pkm/io/safetensors.hpp"
#include "pkm/memory_layer.hpp"

namespace pkm::io {

/// Metadata keys pkm reads and writes.
inline constexpr const char* kMetaKnn = "mem_knn";
inline constexpr const char* kMetaQkNorm = "qk_norm";
inline constexpr const char* kMetaQkNormScale = "qk_norm_scale";
/// MemoryConfig::score_activation: "softmax" (also when absent) or "relu".
inline constexpr const char* kMetaScoreActivation = "score_activation";
/// A column shard of a value table (pkm/distributed, pkm/io/shards.hpp): the file's
/// values.weight holds columns [begin, end) of a table of v_dim columns.
inline constexpr const char* kMetaShardBegin = "pkm_shard_column_begin";
inline constexpr const char* kMetaShardEnd = "pkm_shard_column_end";
inline constexpr const char* kMetaShardVDim = "pkm_shard_v_dim";
/// A quantized value table (pkm/quantized_table.hpp): values.weight holds its rows as U8, shape
/// (rows, row bytes); these keys (after LoadOptions::prefix) give the format's dtype_name and
/// v_dim, which the row bytes alone do not fix (an int4 row of 7 or 8 values has 8 bytes).
inline constexpr const char* kMetaValuesFormat = "pkm_values_format";
inline constexpr const char* kMetaValuesDim = "pkm_values_dim";

/// The columns a shard file holds.
struct ShardRange {
  std::int64_t begin = 0, end = 0, v_dim = 0;
  std::int64_t width() const { return end - begin; }
};

/// What the caller says about a checkpoint; each set field wins over the file's metadata.
struct LoadOptions {
  std::optional<std::int64_t> knn;
  std::optional<bool> qk_norm;
  std::optional<double> qk_norm_scale;
  std::optional<ScoreActivation> score_activation;
  /// Prepended to every tensor name (a layer inside a whole model's checkpoint, e.g.
  /// "layers.4.memory.").
  std::string prefix;
  /// load_layer_mapped: how the table's rows come from the disk (pkm/io/mapped_table.hpp).
  TableFetch fetch = TableFetch::page_faults;
};

namespace detail {
[[noreturn]] inline void bad_checkpoint(const SafetensorsFile& f, const std::string& what) {
  throw std::invalid_argument("checkpoint '" + f.path() + "': " + what);
}

inline std::int64_t parse_int(const SafetensorsFile& f, const std::string& key,
                              const std::string& s) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || errno != 0 || *end != '\0') {
    bad_checkpoint(f, "__metadata__ '" + key + "' = \"" + s + "\" is not an integer");
  }
  return v;
}
inline double parse_double(const SafetensorsFile& f, const std::string& key, const std::string& s) {
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || errno != 0 || *end != '\0') {
    bad_checkpoint(f, "__metadata__ '" + key + "' = \"" + s + "\" is not a number");
  }
  return v;
}
inline bool parse_bool(const SafetensorsFile& f, const std::string& key, const std::string& s) {
  if (s == "true" || s == "True" || s == "1") return true;
  if (s == "false" || s == "False" || s == "0") return false;
  bad_checkpoint(f, "__metadata__ '" + key + "' = \"" + s + "\" is not true or false");
}

/// The file's shard range, if its metadata marks it as a column shard (all three keys,
/// 0 <= begin < end <= v_dim), else nullopt. Throws std::invalid_argument for a partial or
/// inconsistent marking.
inline std::optional<ShardRange> shard_range(const SafetensorsFile& f) {
  const auto& meta = f.metadata();
  const int present = int(meta.count(kMetaShardBegin)) + int(meta.count(kMetaShardEnd)) +
                      int(meta.count(kMetaShardVDim));
  if (present == 0) return std::nullopt;
  if (present != 3) {
    bad_checkpoint(f, std::string("__metadata__ has only some of '") + kMetaShardBegin + "', '" +
                          kMetaShardEnd + "' and '" + kMetaShardVDim +
                          "'; a column shard needs all three");
  }
  ShardRange r;
  r.begin = parse_int(f, kMetaShardBegin, meta.at(kMetaShardBegin));
  r.end = parse_int(f, kMetaShardEnd, meta.at(kMetaShardEnd));
  r.v_dim = parse_int(f, kMetaShardVDim, meta.at(kMetaShardVDim));
  if (!(0 <= r.begin && r.begin < r.end && r.end <= r.v_dim && r.v_dim <= kMaxDim)) {
    bad_checkpoint(f, "shard columns [" + std::to_string(r.begin) + ", " + std::to_string(r.end) +
                          ") of " + std::to_string(r.v_dim) +
                          "; expected 0 <= begin < end <= v_dim <= " + std::to_string(kMaxDim));
  }
  return r;
}

inline void refuse_shard(const SafetensorsFile& f) {
  if (const auto r = shard_range(f)) {
    bad_checkpoint(
        f, "holds only columns [" + std::to_string(r->begin) + ", " + std::to_string(r->end) +
               ") of the " + std::to_string(r->v_dim) +
               "-column value table (a shard of a memory-parallel layer); "
               "gather the shards into one file first (pkm::io::gather_shards, pkm_shards gather)");
  }
}

/// The quantized format of the table under `prefix`, from the metadata, or nothing for a
/// table of float elements.
inline std::optional<Dtype> values_format(const SafetensorsFile& f, const std::string& prefix) {
  const auto& meta = f.metadata();
  const auto it = meta.find(prefix + kMetaValuesFormat);
  const std::string name = prefix + "values.weight";
  if (it == meta.end()) {
    if (f.has(name) && f.info(name).dtype == Dtype::u8) {
      bad_checkpoint(f, "tensor '" + name + "' is U8 but __metadata__ has no '" + prefix +
                            kMetaValuesFormat + "' naming its quantized format");
    }
    return std::nullopt;
  }
  const auto d = parse_quantized_dtype(it->second);
  if (!d) {
    bad_checkpoint(f, "__metadata__ '" + prefix + kMetaValuesFormat + "' = \"" +
                          clip(it->second, 48) +
                          "\"; expected INT8_ROWWISE, INT4_ROWWISE or FP8_E4M3_ROWWISE");
  }
  return d;
}

/// The shape of tensor t as safetensors writes it: rank 1 for biases, 2 otherwise.
inline std::vector<std::int64_t> file_shape(const MemoryConfig& c, Tensor t) {
  const TensorShape s = tensor_shape(c, t);
  if (s.rank == 1) return {s.rows};
  return {s.rows, s.cols};
}

inline const TensorInfo& rank2(const SafetensorsFile& f, const std::string& name) {
  const TensorInfo& t = f.info(name);
  if (t.shape.size() != 2) {
    bad_checkpoint(
        f, "tensor '" + name + "' has shape " + t.shape_string() + "; expected 2 dimensions");
  }
  return t;
}
}  // namespace detail

/// The layer's config, from the tensors' shapes and presence plus metadata and options.
/// Throws std::invalid_argument naming the file and the tensor or setting at fault.
inline MemoryConfig infer_config(const SafetensorsFile& f, const LoadOptions& opt = {}) {
  const std::string& p = opt.prefix;
  auto name = [&](Tensor t) { return p + tensor_name(t); };
  for (const char* required : {"keys", "values.weight", "query_proj.query_mlps.0.weight"}) {
    if (!f.has(p + required)) detail::bad_checkpoint(f, "tensor '" + p + required + "' is missing");
  }
  const TensorInfo& values = detail::rank2(f, p + "values.weight");
  const TensorInfo& keys = detail::rank2(f, name(Tensor::keys));
  const TensorInfo& wq = detail::rank2(f, name(Tensor::query_weight));
  MemoryConfig c;
  const std::int64_t slots = values.shape[0];
  c.n_keys = static_cast<std::int64_t>(std::llround(std::sqrt(static_cast<double>(slots))));
  if (c.n_keys * c.n_keys != slots || slots == 0) {
    detail::bad_checkpoint(f, "values.weight has " + std::to_string(slots) +
                                  " rows; expected n_keys^2 for some n_keys");
  }
  c.v_dim = values.shape[1];
  const std::optional<Dtype> quantized = detail::values_format(f, p);
  if (quantized) {
    if (values.dtype != Dtype::u8) {
      detail::bad_checkpoint(f, "tensor '" + p + "values.weight' has dtype " +
                                    dtype_name(values.dtype) + "; a " + dtype_name(*quantized) +
                                    " table is stored as U8 rows");
    }
    if (detail::shard_range(f)) {
      detail::bad_checkpoint(f, "a column shard cannot hold a quantized table");
    }
    const auto it = f.metadata().find(p + kMetaValuesDim);
    if (it == f.metadata().end()) {
      detail::bad_checkpoint(f, "__metadata__ has no '" + p + kMetaValuesDim +
                                    "' (v_dim of the quantized table)");
    }
    const std::int64_t dim = detail::parse_int(f, p + kMetaValuesDim, it->second);
    if (dim < 1 || dim > (std::int64_t{1} << 40)) {
      detail::bad_checkpoint(f, "__metadata__ '" + p + kMetaValuesDim + "' = " +
                                    std::to_string(dim) + "; expected 1 to 2^40");
    }
    const Index rb = quantized_row_bytes(*quantized, dim);
    if (values.shape[1] != rb) {
      detail::bad_checkpoint(f, "tensor '" + p + "values.weight' has rows of " +
                                    std::to_string(values.shape[1]) + " bytes; a " +
                                    dtype_name(*quantized) + " row of " + std::to_string(dim) +
                                    " values has " + std::to_string(rb));
    }
    c.v_dim = dim;
  }
  if (const auto shard =
          detail::shard_range(f)) {  // a column shard: the table's width from the metadata
    if (values.shape[1] != shard->width()) {
      detail::bad_checkpoint(f, "values.weight has " + std::to_string(values.shape[1]) +
                                    " columns, expected the " + std::to_string(shard->width()) +
                                    " of its shard metadata");
    }
    c.v_dim = shard->v_dim;
  }
  const std::int64_t half = keys.shape[1];
  c.k_dim = 2 * half;
  if (c.n_keys == 0 || keys.shape[0] % (2 * c.n_keys) != 0 || keys.shape[0] == 0) {
    detail::bad_checkpoint(
        f, "keys has " + std::to_string(keys.shape[0]) +
               " rows; expected 2 * heads * n_keys with n_keys = " + std::to_string(c.n_keys));
  }
  c.heads = keys.shape[0] / (2 * c.n_keys);
  c.input_dim = wq.shape[1];
  c.query_bias = f.has(name(Tensor::query_bias));
  c.memory_plus = f.has(name(Tensor::swilu_weight));
  c.value_projection = f.has(name(Tensor::value_proj_weight));
  c.gating = f.has(name(Tensor::gate_weight));
  c.output_dim =
      c.value_projection ? detail::rank2(f, name(Tensor::value_proj_weight)).shape[0] : c.v_dim;
  for (auto [w, b] : {std::pair{Tensor::swilu_weight, Tensor::swilu_bias},
                      std::pair{Tensor::value_proj_weight, Tensor::value_proj_bias},
                      std::pair{Tensor::gate_weight, Tensor::gate_bias}}) {
    if (f.has(name(w)) != f.has(name(b))) {
      detail::bad_checkpoint(f, "'" + name(f.has(name(w)) ? b : w) + "' is missing; '" + name(w) +
                                    "' and '" + name(b) + "' come together");
    }
  }
  const auto& meta = f.metadata();
  if (opt.knn) {
    c.knn = *opt.knn;
  } else if (auto it = meta.find(kMetaKnn); it != meta.end()) {
    c.knn = detail::parse_int(f, kMetaKnn, it->second);
  } else {
    detail::bad_checkpoint(
        f,
        "knn is not in the file's __metadata__ (\"mem_knn\"); pass it (LoadOptions::knn, --knn)");
  }
  if (opt.qk_norm) {
    c.qk_norm = *opt.qk_norm;
  } else if (auto it = meta.find(kMetaQkNorm); it != meta.end()) {
    c.qk_norm = detail::parse_bool(f, kMetaQkNorm, it->second);
  }
  if (opt.qk_norm_scale) {
    c.qk_norm_scale = *opt.qk_norm_scale;
  } else if (auto it = meta.find(kMetaQkNormScale); it != meta.end()) {
    c.qk_norm_scale = detail::parse_double(f, kMetaQkNormScale, it->second);
  }
  if (opt.score_activation) {
    c.score_activation = *opt.score_activation;
  } else if (auto it = meta.find(kMetaScoreActivation); it != meta.end()) {
    const auto a = parse_score_activation(it->second);
    if (!a) {
      detail::bad_checkpoint(f, std::string("metadata \"") + kMetaScoreActivation + "\" = \"" +
                                    it->second + "\"; expected \"softmax\" or \"relu\"");
    }
    c.score_activation = *a;
  }
  try {
    c.validate();
  } catch (const std::invalid_argument& e) {
    detail::bad_checkpoint(f, e.what());
  }
  // Every present tensor must have exactly the shape the config implies.
  for (int t = 0; t < kNumTensors; ++t) {
    const Tensor tensor = Tensor(t);
    if (!tensor_shape(c, tensor).present) continue;
    const auto want = detail::file_shape(c, tensor);
    const TensorInfo& info = f.info(name(tensor));
    if (info.shape != want) {
      detail::bad_checkpoint(f, "tensor '" + name(tensor) + "' has shape " + info.shape_string() +
                                    ", expected " + shape_string(want));
    }
    if (!is_float(info.dtype)) {
      detail::bad_checkpoint(f, "tensor '" + name(tensor) + "' has dtype " +
                                    dtype_name(info.dtype) + "; expected a float dtype");
    }
  }
  if (!quantized && !is_float(values.dtype)) {
    detail::bad_checkpoint(f, "tensor 'values.weight' has dtype " +
                                  std::string(dtype_name(values.dtype)) +
                                  "; expected a float dtype");
  }
  return c;
}

/// Reads the dense parameters of the layer described by `c` from `f` (converting dtypes).
template <class Scalar>
LayerParameters<Scalar> load_parameters(const SafetensorsFile& f, const MemoryConfig& c,
                                        const std::string& prefix = "") {
  LayerParameters<Scalar> params(c);
  params.for_each([&](Tensor t, MatrixMap<Scalar> m) {
    f.read(prefix + tensor_name(t), m.data(), static_cast<std::size_t>(m.size()));
  });
  return params;
}

namespace detail {
/// load_parameters, with a non-finite parameter refused (std::invalid_argument naming it).
template <class Scalar>
LayerParameters<Scalar> load_checked_parameters(const SafetensorsFile& f, const MemoryConfig& c,
                                                const std::string& prefix, const char* who) {
  LayerParameters<Scalar> params = load_parameters<Scalar>(f, c, prefix);
  try {
    check_parameters_finite(who, params);
  } catch (const std::runtime_error& e) {
    bad_checkpoint(f, e.what());
  }
  return params;
}
}  // namespace detail

/// Loads a layer: parameters as Scalar, the value table converted to TableT (e.g. a BF16
/// table kept as pkm::bf16, or converted to float). Everything is copied out of the file
/// (with pread: a file truncated meanwhile gives std::runtime_error), then checked: a
/// parameter or table value that is NaN or infinite (after conversion) throws
/// std::invalid_argument naming the tensor and the row or element.
namespace detail {
/// Refuses a quantized file for a float TableT and a float file for pkm::Quantized.
template <class TableT>
void check_table_kind(const SafetensorsFile& f, const std::string& prefix) {
  const std::optional<Dtype> q = values_format(f, prefix);
  if constexpr (std::is_same_v<TableT, Quantized>) {
    if (!q) {
      bad_checkpoint(f, "tensor '" + prefix + "values.weight' is not quantized (" +
                            dtype_name(f.info(prefix + "values.weight").dtype) +
                            "); quantize it first (pkm::quantize, pkm_quantize) or load it with a "
                            "float table type");
    }
  } else {
    if (q) {
      bad_checkpoint(f, "tensor '" + prefix + "values.weight' is a " + dtype_name(*q) +
                            " table; load it with TableT = pkm::Quantized (inference only)");
    }
  }
}
}  // namespace detail

template <class Scalar, class TableT = Scalar>
MemoryLayer<Scalar, TableT> load_layer(const SafetensorsFile& f, const LoadOptions& opt = {}) {
  detail::refuse_shard(f);
  detail::check_table_kind<TableT>(f, opt.prefix);
  const MemoryConfig c = infer_config(f, opt);
  if constexpr (std::is_same_v<TableT, Quantized>) {
    const Dtype format = *detail::values_format(f, opt.prefix);
    QuantizedTable table(format, c.slots(), c.v_dim);
    f.read(opt.prefix + "values.weight", table.data(), static_cast<std::size_t>(table.bytes()));
    if (const Index r = first_invalid_row(table); r >= 0) {
      detail::bad_checkpoint(f, "tensor '" + opt.prefix + "values.weight' row " +
                                    std::to_string(r) + " is not a valid " + dtype_name(format) +
                                    " row (a NaN or infinite scale or bias, or an fp8 NaN code)");
    }
    LayerParameters<Scalar> params = detail::load_checked_parameters<Scalar>(f, c, opt.prefix, "load_layer");
    return MemoryLayer<Scalar, TableT>(std::move(params), std::move(table));
  } else {
  ValueTable<TableT> table(c.slots(), c.v_dim);
  f.read(opt.prefix + "values.weight", table.data(), static_cast<std::size_t>(c.slots() * c.v_dim));
  if (const Index r = first_non_finite_row(table); r >= 0) {
    detail::bad_checkpoint(f, "tensor '" + opt.prefix + "values.weight' row " + std::to_string(r) +
                                  " holds a non-finite value (as " +
                                  dtype_name(dtype_of<TableT>()) + ")");
  }
  LayerParameters<Scalar> params = detail::load_checked_parameters<Scalar>(f, c, opt.prefix, "load_layer");
  return MemoryLayer<Scalar, TableT>(std::move(params), std::move(table));
  }
}

/// Loads a layer whose value table is a view into the file's mapping: no copy of the table.
/// The file's dtype must be TableT's and its data aligned for TableT. The layer keeps the
/// mapping alive (its RowFetch hook holds a copy of `f`), and each forward first checks that
/// the file was not truncated or rewritten meanwhile (runtime_error, not SIGBUS); opt.fetch
/// chooses how the rows come from the disk (pkm/io/mapped_table.hpp). Writes to the table
/// (fine-tuning) stay in memory, never in the file.
/// The dense parameters are checked as by load_layer; the table is not scanned (that would
/// read all of it): forward checks the rows it reads, and pkm::first_non_finite_row checks
/// it all on demand.
template <class Scalar, class TableT = Scalar>
MemoryLayer<Scalar, TableT> load_layer_mapped(SafetensorsFile& f, const LoadOptions& opt = {}) {
  detail::refuse_shard(f);
  detail::check_table_kind<TableT>(f, opt.prefix);
  const MemoryConfig c = infer_config(f, opt);
  const TensorInfo& v = f.info(opt.prefix + "values.weight");
  if constexpr (std::is_same_v<TableT, Quantized>) {
    LayerParameters<Scalar> params = detail::load_checked_parameters<Scalar>(f, c, opt.prefix, "load_layer_mapped");
    const Dtype format = *detail::values_format(f, opt.prefix);
    MemoryLayer<Scalar, TableT> layer(
        std::move(params), QuantizedTable::view(format, f.mutable_bytes(v), c.slots(), c.v_dim));
    layer.set_row_fetch(MappedTableFetch(f, v, c.slots(),
                                         std::uint64_t(quantized_row_bytes(format, c.v_dim)),
                                         opt.fetch));
    return layer;
  } else {
  if (v.dtype != dtype_of<TableT>()) {
    detail::bad_checkpoint(f, "values.weight is " + std::string(dtype_name(v.dtype)) +
                                  "; mapping it needs " + dtype_name(dtype_of<TableT>()) +
                                  " (use load_layer to convert)");
  }
  std::uint8_t* p = f.mutable_bytes(v);
  if (reinterpret_cast<std::uintptr_t>(p) % alignof(TableT) != 0) {
    detail::bad_checkpoint(
        f, "values.weight is not aligned for its dtype in the file; use load_layer");
  }
  LayerParameters<Scalar> params = detail::load_checked_parameters<Scalar>(f, c, opt.prefix, "load_layer_mapped");
  MemoryLayer<Scalar, TableT> layer(
      std::move(params),
      ValueTable<TableT>::view(reinterpret_cast<TableT*>(p), c.slots(), c.v_dim));
  layer.set_row_fetch(MappedTableFetch(
      f, v, c.slots(), std::uint64_t(c.v_dim) * sizeof(TableT), opt.fetch));
  return layer;
  }
}

/// The same from a file object the caller does not keep: the layer holds the mapping itself.
template <class Scalar, class TableT = Scalar>
MemoryLayer<Scalar, TableT> load_layer_mapped(SafetensorsFile&& f, const LoadOptions& opt = {}) {
  return load_layer_mapped<Scalar, TableT>(f, opt);
}

namespace detail {
/// pkm's metadata of a layer's config (not prefixed).
inline void add_metadata(SafetensorsWriter& w, const MemoryConfig& c) {
  w.set_metadata(kMetaKnn, std::to_string(c.knn));
  w.set_metadata(kMetaQkNorm, c.qk_norm ? "true" : "false");
  if (c.qk_norm_scale) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.17g", *c.qk_norm_scale);
    w.set_metadata(kMetaQkNormScale, buf);
  }
  // Written where it is not the default, so that a softmax layer's file stays as it was.
  if (c.score_activation != ScoreActivation::softmax)
    w.set_metadata(kMetaScoreActivation, score_activation_name(c.score_activation));
}
/// Adds the dense parameters under the reference names.
template <class Scalar>
void add_dense(SafetensorsWriter& w, const LayerParameters<Scalar>& params,
               const std::string& prefix) {
  params.for_each([&](Tensor t, ConstMatrixMap<Scalar> m) {
    w.add(prefix + tensor_name(t), file_shape(params.config(), t), m.data());
  });
}

/// Adds dense parameters and a value table (the whole table or a column shard) under the
/// reference names, with pkm's metadata. The table must be contiguous.
template <class Scalar, class TableT>
void add_parts(SafetensorsWriter& w, const LayerParameters<Scalar>& params,
               const ValueTable<TableT>& values, const std::string& prefix) {
  const MemoryConfig& c = params.config();
  if (values.stride() != values.dim()) {
    throw std::invalid_argument("pkm::io::add_layer: the value table has stride " +
                                std::to_string(values.stride()) +
                                "; saving needs a contiguous table");
  }
  add_dense(w, params, prefix);
  w.add(prefix + "values.weight", {values.rows(), values.dim()},
        static_cast<const TableT*>(values.data()));
  add_metadata(w, c);
}

/// As above for a quantized table: its rows as U8, its format and v_dim in the metadata.
template <class Scalar>
void add_parts(SafetensorsWriter& w, const LayerParameters<Scalar>& params,
               const QuantizedTable& values, const std::string& prefix) {
  const MemoryConfig& c = params.config();
  if (values.stride() != values.row_bytes()) {
    throw std::invalid_argument("pkm::io::add_layer: the quantized table has rows " +
                                std::to_string(values.stride()) + " bytes apart; saving needs "
                                "packed rows of " + std::to_string(values.row_bytes()));
  }
  add_dense(w, params, prefix);
  w.add(prefix + "values.weight", {values.rows(), values.row_bytes()},
        static_cast<const std::uint8_t*>(values.data()));
  w.set_metadata(prefix + kMetaValuesFormat, dtype_name(values.format()));
  w.set_metadata(prefix + kMetaValuesDim, std::to_string(values.dim()));
  add_metadata(w, c);
}

}  // namespace detail

/// Adds the layer's tensors, named prefix + the reference names, to `w`, with the metadata
/// (mem_knn, qk_norm and, when set, qk_norm_scale and a score_activation other than softmax;
/// not prefixed) that make a load give back
/// the same layer, bit for bit. The data is kept by pointer until w.write(). The value table
/// must be contiguous (stride == v_dim).
template <class Scalar, class TableT>
void add_layer(SafetensorsWriter& w, const MemoryLayer<Scalar, TableT>& layer,
               const std::string& prefix = "") {
  detail::add_parts(w, layer.params(), layer.values(), prefix);
}

/// Writes the layer to `path` (add_layer with no prefix, plus `extra_metadata`).
template <class Scalar, class TableT>
void save_layer(const std::string& path, const MemoryLayer<Scalar, TableT>& layer,
                const std::map<std::string, std::string>& extra_metadata = {}) {
  SafetensorsWriter w;
  for (const auto& [k, v] : extra_metadata) w.set_metadata(k, v);
  add_layer(w, layer);
  w.write(path);
}

}  // namespace pkm::io
