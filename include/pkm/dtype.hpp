// pkm/dtype.hpp — the one vocabulary of element types in pkm: checkpoint files (safetensors
// dtypes), value tables, the CUDA kernels and the memory-parallel group's fingerprints all name
// a type with pkm::Dtype. Plain C++ without Eigen, so the CUDA headers use it too; which C++
// type each one is stored as is pkm::dtype_of<T>() (pkm/types.hpp). The row-wise quantized
// table formats (pkm/quantized_table.hpp, docs/quantization.md) are in this list too: they
// name how a table's rows are stored, not an element type a file holds (a file holds their
// rows as U8 bytes, the format in its metadata).
#pragma once

#include <cstddef>
#include <optional>
#include <string>

namespace pkm {

enum class Dtype : int {
  f32 = 0,
  bf16 = 1,
  f16 = 2,
  f64 = 3,
  i64 = 4,
  i32 = 5,
  u8 = 6,
  /// Row-wise int8: v_dim unsigned bytes, then fp32 scale and fp32 bias (FBGEMM's fused 8-bit
  /// row-wise layout); x = scale * q + bias.
  int8_rowwise = 7,
  /// Row-wise int4: ceil(v_dim / 2) bytes (element j in byte j / 2, low nibble first), then
  /// fp16 scale and fp16 bias (FBGEMM's fused 4-bit row-wise layout); x = scale * q + bias.
  int4_rowwise = 8,
  /// Row-wise fp8: v_dim OCP e4m3fn bytes (torch.float8_e4m3fn), then an fp32 scale;
  /// x = scale * fp8.
  fp8_rowwise = 9,
  // The names of pkm 0.1's io::Dtype, kept for one release.
  F32 [[deprecated("use pkm::Dtype::f32")]] = f32,
  F64 [[deprecated("use pkm::Dtype::f64")]] = f64,
  BF16 [[deprecated("use pkm::Dtype::bf16")]] = bf16,
  F16 [[deprecated("use pkm::Dtype::f16")]] = f16,
  I64 [[deprecated("use pkm::Dtype::i64")]] = i64,
  I32 [[deprecated("use pkm::Dtype::i32")]] = i32,
};

/// Every element Dtype (what a safetensors file holds), once.
inline constexpr Dtype kDtypes[] = {Dtype::f32, Dtype::bf16, Dtype::f16, Dtype::f64,
                                    Dtype::i64, Dtype::i32,  Dtype::u8};
/// Every row-wise quantized table format, once.
inline constexpr Dtype kQuantizedDtypes[] = {Dtype::int8_rowwise, Dtype::int4_rowwise,
                                             Dtype::fp8_rowwise};

constexpr bool is_quantized(Dtype d) {
  return d == Dtype::int8_rowwise || d == Dtype::int4_rowwise || d == Dtype::fp8_rowwise;
}

/// Bytes of one element; 0 for a quantized format, whose rows are quantized_row_bytes().
constexpr std::size_t dtype_size(Dtype d) {
  switch (d) {
    case Dtype::f32:
      return 4;
    case Dtype::bf16:
      return 2;
    case Dtype::f16:
      return 2;
    case Dtype::f64:
      return 8;
    case Dtype::i64:
      return 8;
    case Dtype::i32:
      return 4;
    case Dtype::u8:
      return 1;
    case Dtype::int8_rowwise:
    case Dtype::int4_rowwise:
    case Dtype::fp8_rowwise:
      return 0;
  }
  return 0;
}

/// The name a safetensors header gives it ("F32", "BF16", ...), which pkm's messages use too.
constexpr const char* dtype_name(Dtype d) {
  switch (d) {
    case Dtype::f32:
      return "F32";
    case Dtype::bf16:
      return "BF16";
    case Dtype::f16:
      return "F16";
    case Dtype::f64:
      return "F64";
    case Dtype::i64:
      return "I64";
    case Dtype::i32:
      return "I32";
    case Dtype::u8:
      return "U8";
    case Dtype::int8_rowwise:
      return "INT8_ROWWISE";
    case Dtype::int4_rowwise:
      return "INT4_ROWWISE";
    case Dtype::fp8_rowwise:
      return "FP8_E4M3_ROWWISE";
  }
  return "?";
}

/// The Dtype of a safetensors element name, or nothing for a name pkm does not read (the
/// quantized formats are not element dtypes: parse_quantized_dtype reads their names).
inline std::optional<Dtype> parse_dtype(const std::string& s) {
  for (Dtype d : kDtypes) {
    if (s == dtype_name(d)) return d;
  }
  return std::nullopt;
}

/// The quantized format named `s`: its dtype_name ("INT8_ROWWISE", ...) or the short name a
/// command line takes ("int8", "int4", "fp8"); nothing for any other name.
inline std::optional<Dtype> parse_quantized_dtype(const std::string& s) {
  if (s == "int8") return Dtype::int8_rowwise;
  if (s == "int4") return Dtype::int4_rowwise;
  if (s == "fp8") return Dtype::fp8_rowwise;
  for (Dtype d : kQuantizedDtypes) {
    if (s == dtype_name(d)) return d;
  }
  return std::nullopt;
}

constexpr bool is_float(Dtype d) {
  return d == Dtype::f32 || d == Dtype::f64 || d == Dtype::bf16 || d == Dtype::f16;
}

}  // namespace pkm
