// pkm/types.hpp — the Eigen aliases pkm uses in its interfaces (all row-major).
#pragma once

#include <Eigen/Core>
#include <cstdint>
#include <type_traits>

#include "pkm/dtype.hpp"

namespace pkm {

using Index = std::int64_t;

template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;
template <class T>
using MatrixMap = Eigen::Map<RowMatrix<T>>;
template <class T>
using ConstMatrixMap = Eigen::Map<const RowMatrix<T>>;
template <class T>
using VectorMap = Eigen::Map<Vector<T>>;
template <class T>
using ConstVectorMap = Eigen::Map<const Vector<T>>;
/// What pkm's functions take as input: any row-major block with unit inner stride.
template <class T>
using ConstMatrixRef = Eigen::Ref<const RowMatrix<T>>;
template <class T>
using MatrixRef = Eigen::Ref<RowMatrix<T>>;

/// Slot ids (rows of the value table), as PyTorch's int64 indices.
using IndexMatrix = RowMatrix<std::int64_t>;
using ConstIndexRef = Eigen::Ref<const IndexMatrix>;

/// 16-bit storage types for value tables (rows are summed in float).
using bf16 = Eigen::bfloat16;
using fp16 = Eigen::half;

/// The Dtype a C++ element type is stored as.
template <class T>
constexpr Dtype dtype_of() {
  if constexpr (std::is_same_v<T, float>)
    return Dtype::f32;
  else if constexpr (std::is_same_v<T, double>)
    return Dtype::f64;
  else if constexpr (std::is_same_v<T, bf16>)
    return Dtype::bf16;
  else if constexpr (std::is_same_v<T, fp16>)
    return Dtype::f16;
  else if constexpr (std::is_same_v<T, std::int64_t>)
    return Dtype::i64;
  else if constexpr (std::is_same_v<T, std::uint8_t>)
    return Dtype::u8;
  else {
    static_assert(std::is_same_v<T, std::int32_t>, "pkm::dtype_of: no Dtype for this type");
    return Dtype::i32;
  }
}

}  // namespace pkm
