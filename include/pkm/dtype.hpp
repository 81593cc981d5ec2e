// pkm/dtype.hpp — the one vocabulary of element types in pkm: checkpoint files (safetensors
// dtypes), value tables, the CUDA kernels and the memory-parallel group's fingerprints all name
// a type with pkm::Dtype. Plain C++ without Eigen, so the CUDA headers use it too; which C++
// type each one is stored as is pkm::dtype_of<T>() (pkm/types.hpp). New storage formats (the
// quantized tables) join this list.
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
  // The names of pkm 0.1's io::Dtype, kept for one release.
  F32 [[deprecated("use pkm::Dtype::f32")]] = f32,
  F64 [[deprecated("use pkm::Dtype::f64")]] = f64,
  BF16 [[deprecated("use pkm::Dtype::bf16")]] = bf16,
  F16 [[deprecated("use pkm::Dtype::f16")]] = f16,
  I64 [[deprecated("use pkm::Dtype::i64")]] = i64,
  I32 [[deprecated("use pkm::Dtype::i32")]] = i32,
};

/// Every Dtype, once.
inline constexpr Dtype kDtypes[] = {Dtype::f32, Dtype::bf16, Dtype::f16,
                                    Dtype::f64, Dtype::i64,  Dtype::i32};

/// Bytes of one element.
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
  }
  return "?";
}

/// The Dtype of a safetensors name, or nothing for a name pkm does not read.
inline std::optional<Dtype> parse_dtype(const std::string& s) {
  for (Dtype d : kDtypes) {
    if (s == dtype_name(d)) return d;
  }
  return std::nullopt;
}

constexpr bool is_float(Dtype d) {
  return d == Dtype::f32 || d == Dtype::f64 || d == Dtype::bf16 || d == Dtype::f16;
}

}  // namespace pkm
