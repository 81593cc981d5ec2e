// pkm/value_table.hpp — the value table (n_keys^2 rows of v_dim), owned or viewing caller
// memory; several layers may read one table (a shared value pool).
#pragma once

#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "pkm/detail/aligned_buffer.hpp"
#include "pkm/detail/checked.hpp"
#include "pkm/detail/parallel.hpp"
#include "pkm/detail/vec_math.hpp"
#include "pkm/types.hpp"

namespace pkm {

/// A row-major table of `rows` x `dim` values of storage type T, rows `stride` elements apart.
/// An owning table is zero-initialised, 2 MiB-aligned when large and advised to use
/// transparent huge pages. A view never copies the caller's memory; the caller keeps it alive.
template <class T>
class ValueTable {
 public:
  using value_type = T;

  ValueTable() = default;
  /// Owning, all zeros.
  ValueTable(Index rows, Index dim) : rows_(rows), dim_(dim), stride_(dim) {
    check_sizes(rows, dim, dim);
    storage_ =
        detail::AlignedBuffer<T>(static_cast<std::size_t>(rows) * static_cast<std::size_t>(dim));
    data_ = storage_.data();
  }
  /// Views `rows` rows of `dim` values at `data`, row r starting at data + r * stride.
  static ValueTable view(T* data, Index rows, Index dim, Index stride = -1) {
    if (stride < 0) stride = dim;
    check_sizes(rows, dim, stride);
    if (data == nullptr) {
      throw std::invalid_argument("pkm::ValueTable::view: data is null for a table of " +
                                  std::to_string(rows) + " x " + std::to_string(dim));
    }
    ValueTable t;
    t.data_ = data;
    t.rows_ = rows;
    t.dim_ = dim;
    t.stride_ = stride;
    return t;
  }
  /// Views a caller's row-major Eigen matrix (or block of one) without copying.
  static ValueTable view(MatrixRef<T> m) {
    return view(m.data(), m.rows(), m.cols(), m.outerStride());
  }

  ValueTable(const ValueTable& o) : rows_(o.rows_), dim_(o.dim_), stride_(o.stride_) {
    copy_from(o);
  }
  ValueTable& operator=(const ValueTable& o) {
    if (this != &o) {
      rows_ = o.rows_;
      dim_ = o.dim_;
      stride_ = o.stride_;
      copy_from(o);
    }
    return *this;
  }
  ValueTable(ValueTable&&) noexcept = default;
  ValueTable& operator=(ValueTable&&) noexcept = default;

  /// A non-owning view of this table (for sharing it between layers).
  ValueTable view() const { return view(data_, rows_, dim_, stride_); }

  Index rows() const { return rows_; }
  Index dim() const { return dim_; }
  Index stride() const { return stride_; }
  bool owns_storage() const { return storage_.size() > 0; }
  T* data() const { return data_; }
  T* row(Index r) const { return data_ + r * stride_; }

  using StridedMap = Eigen::Map<RowMatrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
  StridedMap matrix() const {
    return StridedMap(data_, rows_, dim_, Eigen::OuterStride<>(stride_));
  }

 private:
  static void check_sizes(Index rows, Index dim, Index stride) {
    if (rows < 1 || dim < 1 || stride < dim) {
      throw std::invalid_argument("pkm::ValueTable: rows = " + std::to_string(rows) + ", dim = " +
                                  std::to_string(dim) + ", stride = " + std::to_string(stride) +
                                  "; expected rows >= 1, dim >= 1 and stride >= dim");
    }
    // rows x stride elements of T must be addressable without wrapping (at most 2^62 bytes).
    detail::checked_mul("pkm::ValueTable", "rows x stride x element bytes",
                        detail::checked_mul("pkm::ValueTable", "rows x stride", rows, stride),
                        static_cast<std::int64_t>(sizeof(T)));
  }
  void copy_from(const ValueTable& o) {
    if (o.owns_storage()) {
      storage_ = o.storage_;
      data_ = storage_.data();
    } else {
      storage_ = detail::AlignedBuffer<T>();
      data_ = o.data_;
    }
  }

  detail::AlignedBuffer<T> storage_;
  T* data_ = nullptr;
  Index rows_ = 0;
  Index dim_ = 0;
  Index stride_ = 0;
};

namespace detail {
/// True when the `dim` values at `row` are all finite (16-bit types compared as float).
template <class T>
bool row_finite(const T* row, Index dim) {
  if constexpr (std::is_floating_point_v<T>) {
    return all_finite(row, dim);
  } else {
    for (Index d = 0; d < dim; ++d) {
      if (!std::isfinite(static_cast<float>(row[d]))) return false;
    }
    return true;
  }
}
}  // namespace detail

/// The lowest row of `table` that holds NaN or an infinity, or -1 when every value is finite.
/// pkm does not scan tables on its own (a forward checks only the rows it reads, and
/// load_layer the table it copies): call this after filling or mapping a table yourself.
template <class T>
Index first_non_finite_row(const ValueTable<T>& table) {
  constexpr Index kBlock = 1024;
  const Index rows = table.rows();
  std::vector<Index> first((rows + kBlock - 1) / kBlock, -1);
  detail::parallel_blocks(rows, kBlock, [&](Index r0, Index r1) {
    for (Index r = r0; r < r1; ++r) {
      if (!detail::row_finite(table.row(r), table.dim())) {
        first[r0 / kBlock] = r;
        return;
      }
    }
  });
  for (Index f : first) {
    if (f >= 0) return f;
  }
  return -1;
}

}  // namespace pkm
