// pkm/io/quantize.hpp — quantizing the value table of a safetensors checkpoint, file to file,
// a block of rows at a time: the table is read (pread) and quantized 1024 rows at a time while
// the new file is written, so no second full-precision copy of it (nor a whole quantized one)
// is ever in memory. Every other tensor and the metadata are copied as they are; the table's
// format and v_dim join the metadata (pkm/io/checkpoint.hpp loads the result as a
// MemoryLayer<float, pkm::Quantized>). The command-line tool is examples/pkm_quantize.cpp.
#pragma once

#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "pkm/detail/parallel.hpp"
#include "pkm/io/checkpoint.hpp"
#include "pkm/io/paths.hpp"
#include "pkm/io/safetensors.hpp"
#include "pkm/quantized_table.hpp"

namespace pkm::io {

/// What quantize_checkpoint did.
struct QuantizeReport {
  std::int64_t rows = 0, dim = 0;
  std::uint64_t table_bytes_before = 0, table_bytes_after = 0;
};

/// Writes `out_path`: the checkpoint at `in_path` with its value table `prefix + values.weight`
/// (F32, BF16 or F16, rows x v_dim) quantized to `format` row by row (pkm::quantize_row's
/// rules). Throws, before the output exists and with the input untouched (it is only read):
/// std::invalid_argument for a file it cannot convert (no such table, not 2-D, not a float
/// dtype, already quantized; a row with NaN or infinity, or beyond int4's fp16 range — named),
/// for an output that is the input, and std::runtime_error for a failed read or write. The
/// output is written atomically (pkm::io::SafetensorsWriter::write).
inline QuantizeReport quantize_checkpoint(const std::string& in_path, const std::string& out_path,
                                          Dtype format, const std::string& prefix = "") {
  const char* who = "pkm::io::quantize_checkpoint";
  pkm::detail::check_quantized_format(who, format);
  check_outputs(who, {{"output", out_path}}, {{"input", in_path}});
  const SafetensorsFile in(in_path);
  const std::string table = prefix + "values.weight";
  if (!in.has(table)) {
    throw std::invalid_argument(std::string(who) + ": '" + in_path + "' has no tensor '" + table +
                                "' (the value table; --prefix names a layer inside a model)");
  }
  const TensorInfo& t = in.info(table);
  if (detail::values_format(in, prefix)) {
    throw std::invalid_argument(std::string(who) + ": '" + in_path + "': '" + table +
                                "' is already quantized");
  }
  if (t.shape.size() != 2 || t.shape[0] < 1 || t.shape[1] < 1 || !is_float(t.dtype) ||
      t.dtype == Dtype::f64) {
    throw std::invalid_argument(std::string(who) + ": '" + in_path + "': '" + table + "' is " +
                                dtype_name(t.dtype) + " " + t.shape_string() +
                                "; expected a 2-D F32, BF16 or F16 table");
  }
  const std::int64_t rows = t.shape[0], dim = t.shape[1];
  const Index rb = quantized_row_bytes(format, dim);
  SafetensorsWriter w;
  for (const auto& [k, v] : in.metadata()) w.set_metadata(k, v);
  w.set_metadata(prefix + kMetaValuesFormat, dtype_name(format));
  w.set_metadata(prefix + kMetaValuesDim, std::to_string(dim));
  // Every other tensor as it is (copied out of the file now: they are the small ones).
  std::vector<std::vector<std::uint8_t>> kept;
  kept.reserve(in.tensors().size());
  for (const TensorInfo& o : in.tensors()) {
    if (o.name == table) continue;
    kept.emplace_back(static_cast<std::size_t>(o.end - o.begin));
    in.read_raw(o, kept.back().data());
    w.add(o.name, o.dtype, o.shape, kept.back().data());
  }
  constexpr std::int64_t kRowsPerChunk = 1024;
  std::vector<float> block;
  std::vector<std::string> errors;
  w.add_generated(
      table, Dtype::u8, {rows, rb}, static_cast<std::uint64_t>(kRowsPerChunk * rb),
      [&](std::uint64_t offset, std::uint8_t* out, std::size_t n) {
        const auto r0 = static_cast<std::int64_t>(offset / static_cast<std::uint64_t>(rb));
        const auto count = static_cast<std::int64_t>(n / static_cast<std::size_t>(rb));
        block.resize(static_cast<std::size_t>(count * dim));
        in.read_range(table, static_cast<std::uint64_t>(r0 * dim),
                      static_cast<std::size_t>(count * dim), block.data());
        errors.assign(static_cast<std::size_t>((count + 63) / 64), std::string());
        pkm::detail::parallel_blocks(count, 64, [&](Index a, Index b) {
          for (Index r = a; r < b; ++r) {
            try {
              quantize_row(format, block.data() + r * dim, dim, out + r * rb, r0 + r);
            } catch (const std::invalid_argument& e) {
              errors[static_cast<std::size_t>(a / 64)] = e.what();
              return;
            }
          }
        });
        for (const std::string& e : errors) {
          if (!e.empty()) {
            throw std::invalid_argument(std::string(who) + ": '" + in_path + "': " + e +
                                        " (no output was written)");
          }
        }
      });
  w.write(out_path);
  QuantizeReport r;
  r.rows = rows;
  r.dim = dim;
  r.table_bytes_before = t.end - t.begin;
  r.table_bytes_after = static_cast<std::uint64_t>(rows * rb);
  return r;
}

}  // namespace pkm::io
