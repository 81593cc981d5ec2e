// pkm/quantized_table.hpp — value tables stored as row-wise quantized rows (int8, int4, fp8 e4m3),
// 3.9x to 7.9x smaller than fp32, for serving a trained layer (docs/quantization.md):
//
//   Dtype::int8_rowwise  v_dim bytes q,               fp32 scale, fp32 bias   x = scale q + bias
//   Dtype::int4_rowwise  ceil(v_dim/2) bytes, 2 q a byte (low nibble first),
//                                                      fp16 scale, fp16 bias   x = scale q + bias
//   Dtype::fp8_rowwise   v_dim OCP e4m3fn bytes,      fp32 scale              x = scale fp8
//
// The int8 and int4 rows are byte for byte FBGEMM's fused row-wise formats (Fused8BitRowwise,
// FusedNBitRowwiseSBHalf with bit rate 4), so tables TorchRec or FBGEMM quantized load as they
// are. A QuantizedTable owns its rows or views the caller's (a file mapping, another layer's
// table), like pkm::ValueTable; pkm::quantize makes one from an fp32 / bf16 / fp16 table.
// Quantized tables serve inference only: a layer reading one refuses backward and optimizer
// steps (train in full precision, then quantize).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "pkm/detail/aligned_buffer.hpp"
#include "pkm/detail/checked.hpp"
#include "pkm/detail/parallel.hpp"
#include "pkm/dtype.hpp"
#include "pkm/types.hpp"
#include "pkm/value_table.hpp"

namespace pkm {

/// The table type tag of a layer that reads a QuantizedTable: MemoryLayer<float, Quantized>.
struct Quantized {};

namespace detail {
inline void check_quantized_format(const char* who, Dtype format) {
  if (!is_quantized(format)) {
    throw std::invalid_argument(std::string(who) + ": format is " + dtype_name(format) +
                                "; expected INT8_ROWWISE, INT4_ROWWISE or FP8_E4M3_ROWWISE");
  }
}
/// Bytes of the values of a row (without its scale and bias).
constexpr Index quantized_value_bytes(Dtype format, Index dim) {
  return format == Dtype::int4_rowwise ? (dim + 1) / 2 : dim;
}
/// Bytes of the scale and bias after a row's values.
constexpr Index quantized_tail_bytes(Dtype format) {
  return format == Dtype::int8_rowwise ? 8 : 4;
}

inline float load_f32(const std::uint8_t* p) {
  float v;
  std::memcpy(&v, p, 4);
  return v;
}
inline float load_f16(const std::uint8_t* p) {
  std::uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(Eigen::numext::bit_cast<fp16>(bits));
}
inline void store_f32(std::uint8_t* p, float v) { std::memcpy(p, &v, 4); }
inline void store_f16(std::uint8_t* p, float v) {
  const auto bits = Eigen::numext::bit_cast<std::uint16_t>(fp16(v));
  std::memcpy(p, &bits, 2);
}

/// The value of an OCP e4m3fn byte (1 sign, 4 exponent bits of bias 7, 3 mantissa bits; no
/// infinities; 0x7F and 0xFF are NaN).
inline float e4m3_to_float(std::uint8_t c) {
  const int e = (c >> 3) & 0xF, m = c & 7;
  float v;
  if (e == 15 && m == 7) {
    v = std::numeric_limits<float>::quiet_NaN();
  } else if (e == 0) {
    v = std::ldexp(static_cast<float>(m), -9);
  } else {
    v = std::ldexp(1.0f + static_cast<float>(m) / 8.0f, e - 7);
  }
  return (c & 0x80) ? -v : v;
}

/// The e4m3fn byte nearest to finite x (ties to the even code), saturating at +-448.
inline std::uint8_t float_to_e4m3(float x) {
  const std::uint8_t sign = std::signbit(x) ? 0x80 : 0;
  const double a = std::fabs(static_cast<double>(x));
  if (a >= 464.0) return sign | 0x7E;  // 448 is the largest; 464 is halfway to the next (480)
  if (a < std::ldexp(1.0, -6)) {       // subnormal: multiples of 2^-9 (8 rounds up to 2^-6)
    return sign | static_cast<std::uint8_t>(std::nearbyint(std::ldexp(a, 9)));
  }
  int exp2 = 0;
  const double f = std::frexp(a, &exp2);  // a = f 2^exp2, f in [0.5, 1)
  int e = exp2 - 1;                       // a = (2f) 2^e, 2f in [1, 2)
  int m = static_cast<int>(std::nearbyint((2.0 * f - 1.0) * 8.0));
  if (m == 8) {
    m = 0;
    ++e;
  }
  const int code = ((e + 7) << 3) | m;
  return sign | static_cast<std::uint8_t>(std::min(code, 0x7E));
}

/// The fp16 bit pattern whose value is 2^-8 times the e4m3fn byte's (its exponent and mantissa
/// bits moved into an fp16's; e4m3's NaN codes read as 480 2^-8): the read's kernels widen
/// fp8 this way (F16C), then multiply by 256 with the row's scale.
inline std::uint16_t e4m3_as_f16_bits(std::uint8_t c) {
  return static_cast<std::uint16_t>(((c & 0x80u) << 8) | ((c & 0x7Fu) << 7));
}
}  // namespace detail

/// Bytes of one row of `dim` values stored as `format` (values, then scale and bias).
inline Index quantized_row_bytes(Dtype format, Index dim) {
  detail::check_quantized_format("pkm::quantized_row_bytes", format);
  if (dim < 1) {
    throw std::invalid_argument("pkm::quantized_row_bytes: dim = " + std::to_string(dim) +
                                "; expected >= 1");
  }
  return detail::checked_add("pkm::quantized_row_bytes", "row bytes",
                             detail::quantized_value_bytes(format, dim),
                             detail::quantized_tail_bytes(format));
}

/// A row's scale and bias (bias 0 for fp8), as float.
struct RowScale {
  float scale = 0;
  float bias = 0;
};

/// The scale and bias of the row of `dim` values at `row`.
inline RowScale quantized_row_scale(Dtype format, const std::uint8_t* row, Index dim) {
  const std::uint8_t* tail = row + detail::quantized_value_bytes(format, dim);
  switch (format) {
    case Dtype::int8_rowwise:
      return {detail::load_f32(tail), detail::load_f32(tail + 4)};
    case Dtype::int4_rowwise:
      return {detail::load_f16(tail), detail::load_f16(tail + 2)};
    default:
      return {detail::load_f32(tail), 0.0f};
  }
}

/// Quantizes the `dim` values at `src` into the row at `dst` (quantized_row_bytes bytes):
///  - int8: scale = (max - min) / 255, bias = min, q = round((x - min) / scale) in [0, 255]
///    (q = 0 where max = min), as FBGEMM's FloatToFused8BitRowwiseQuantized;
///  - int4: bias = min rounded to fp16, scale = (max - bias) / 15 rounded to fp16 (1 where it
///    rounds to 0), q = round((x - bias) / scale) clamped to [0, 15], as FBGEMM's
///    FloatToFusedNBitRowwiseQuantizedSBHalf; every |x| must be at most 65504 (fp16's range);
///  - fp8: scale = max |x| / 448 (1 for a row of zeros), q = e4m3(x / scale) rounded to the
///    nearest (ties to even).
/// Rounding is to the nearest, ties to even, computed in double. Throws
/// std::invalid_argument, writing nothing, for a NaN or infinite value or (int4) one out of
/// fp16's range; the message names the table row `row_id` where one is given.
template <class T>
void quantize_row(Dtype format, const T* src, Index dim, std::uint8_t* dst, Index row_id = -1) {
  const char* who = "pkm::quantize_row";
  detail::check_quantized_format(who, format);
  auto what = [&] {
    return row_id >= 0 ? "value table row " + std::to_string(row_id) : std::string("the row");
  };
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (Index d = 0; d < dim; ++d) {
    const double x = static_cast<double>(static_cast<float>(src[d]));
    if (!std::isfinite(x)) {
      throw std::invalid_argument(std::string(who) + ": " + what() + " holds " +
                                  (std::isnan(x) ? "NaN" : "an infinity") + " at column " +
                                  std::to_string(d) + "; expected finite values");
    }
    lo = std::min(lo, x);
    hi = std::max(hi, x);
  }
  if (format == Dtype::int4_rowwise && std::max(-lo, hi) > 65504.0) {
    throw std::invalid_argument(
        std::string(who) + ": " + what() + " holds " + std::to_string(std::max(-lo, hi) == hi ? hi : lo) +
        "; INT4_ROWWISE keeps fp16 scale and bias, so its values must lie within +-65504 "
        "(use int8 or fp8 for this table)");
  }
  const Index vb = detail::quantized_value_bytes(format, dim);
  std::uint8_t* tail = dst + vb;
  switch (format) {
    case Dtype::int8_rowwise: {
      const float scale = static_cast<float>((hi - lo) / 255.0);
      const float bias = static_cast<float>(lo);
      for (Index d = 0; d < dim; ++d) {
        const double x = static_cast<double>(static_cast<float>(src[d]));
        const double q = scale > 0 ? std::nearbyint((x - bias) / scale) : 0.0;
        dst[d] = static_cast<std::uint8_t>(std::clamp(q, 0.0, 255.0));
      }
      detail::store_f32(tail, scale);
      detail::store_f32(tail + 4, bias);
      break;
    }
    case Dtype::int4_rowwise: {
      const float bias = static_cast<float>(fp16(static_cast<float>(lo)));
      float scale = static_cast<float>(fp16(static_cast<float>((hi - bias) / 15.0)));
      if (!(scale > 0)) scale = 1.0f;
      std::fill(dst, dst + vb, std::uint8_t{0});
      for (Index d = 0; d < dim; ++d) {
        const double x = static_cast<double>(static_cast<float>(src[d]));
        const auto q = static_cast<std::uint8_t>(
            std::clamp(std::nearbyint((x - bias) / scale), 0.0, 15.0));
        dst[d / 2] |= static_cast<std::uint8_t>(q << (4 * (d % 2)));
      }
      detail::store_f16(tail, scale);
      detail::store_f16(tail + 2, bias);
      break;
    }
    default: {
      const double amax = std::max(-lo, hi);
      float scale = static_cast<float>(amax / 448.0);
      if (!(scale > 0)) scale = 1.0f;
      for (Index d = 0; d < dim; ++d) {
        const double x = static_cast<double>(static_cast<float>(src[d]));
        dst[d] = detail::float_to_e4m3(static_cast<float>(x / scale));
      }
      detail::store_f32(tail, scale);
      break;
    }
  }
}

/// Column `d`'s stored code as a float: q (int8, int4) or the e4m3 value (fp8).
inline float quantized_code(Dtype format, const std::uint8_t* row, Index d) {
  switch (format) {
    case Dtype::int8_rowwise:
      return static_cast<float>(row[d]);
    case Dtype::int4_rowwise:
      return static_cast<float>((row[d / 2] >> (4 * (d % 2))) & 0xF);
    default:
      return detail::e4m3_to_float(row[d]);
  }
}

/// Writes the row's `dim` values, scale * code + bias (one rounding each, std::fma), to `dst`.
inline void dequantize_row(Dtype format, const std::uint8_t* row, Index dim, float* dst) {
  detail::check_quantized_format("pkm::dequantize_row", format);
  const RowScale s = quantized_row_scale(format, row, dim);
  for (Index d = 0; d < dim; ++d) dst[d] = std::fma(s.scale, quantized_code(format, row, d), s.bias);
}

/// True when the row decodes to finite values: finite scale and bias and (fp8) no NaN code.
inline bool quantized_row_valid(Dtype format, const std::uint8_t* row, Index dim) {
  const RowScale s = quantized_row_scale(format, row, dim);
  if (!std::isfinite(s.scale) || !std::isfinite(s.bias)) return false;
  if (format == Dtype::fp8_rowwise) {
    for (Index d = 0; d < dim; ++d) {
      if ((row[d] & 0x7F) == 0x7F) return false;
    }
  }
  return true;
}

/// A row-major table of `rows` rows of `dim` values stored as a quantized format, rows
/// `stride` bytes apart (stride >= quantized_row_bytes(format, dim)). Owning (all bytes zero:
/// every row reads as zeros) or a view of the caller's memory, which it never copies.
class QuantizedTable {
 public:
  QuantizedTable() = default;
  /// Owning, all bytes zero.
  QuantizedTable(Dtype format, Index rows, Index dim)
      : format_(format), rows_(rows), dim_(dim) {
    stride_ = check_sizes(format, rows, dim, -1);
    storage_ = detail::AlignedBuffer<std::uint8_t>(static_cast<std::size_t>(rows) *
                                                   static_cast<std::size_t>(stride_));
    data_ = storage_.data();
  }
  /// Views `rows` rows at `data`, row r starting at data + r * stride bytes (stride -1: the
  /// packed row size).
  static QuantizedTable view(Dtype format, std::uint8_t* data, Index rows, Index dim,
                             Index stride = -1) {
    QuantizedTable t;
    t.stride_ = check_sizes(format, rows, dim, stride);
    if (data == nullptr) {
      throw std::invalid_argument("pkm::QuantizedTable::view: data is null for a table of " +
                                  std::to_string(rows) + " x " + std::to_string(dim));
    }
    t.format_ = format;
    t.data_ = data;
    t.rows_ = rows;
    t.dim_ = dim;
    return t;
  }

  QuantizedTable(const QuantizedTable& o)
      : format_(o.format_), rows_(o.rows_), dim_(o.dim_), stride_(o.stride_) {
    copy_from(o);
  }
  QuantizedTable& operator=(const QuantizedTable& o) {
    if (this != &o) {
      format_ = o.format_;
      rows_ = o.rows_;
      dim_ = o.dim_;
      stride_ = o.stride_;
      copy_from(o);
    }
    return *this;
  }
  QuantizedTable(QuantizedTable&&) noexcept = default;
  QuantizedTable& operator=(QuantizedTable&&) noexcept = default;

  /// A non-owning view of this table (for sharing it between layers).
  QuantizedTable view() const { return view(format_, data_, rows_, dim_, stride_); }

  Dtype format() const { return format_; }
  Index rows() const { return rows_; }
  Index dim() const { return dim_; }
  /// Bytes from one row to the next.
  Index stride() const { return stride_; }
  /// Bytes of one row (values, scale, bias).
  Index row_bytes() const { return quantized_row_bytes(format_, dim_); }
  /// Bytes of the whole table (rows x stride).
  Index bytes() const { return rows_ * stride_; }
  bool owns_storage() const { return storage_.size() > 0; }
  std::uint8_t* data() const { return data_; }
  std::uint8_t* row(Index r) const { return data_ + r * stride_; }
  RowScale scale(Index r) const { return quantized_row_scale(format_, row(r), dim_); }

 private:
  static Index check_sizes(Dtype format, Index rows, Index dim, Index stride) {
    const char* who = "pkm::QuantizedTable";
    detail::check_quantized_format(who, format);
    if (rows < 1 || dim < 1) {
      throw std::invalid_argument(std::string(who) + ": rows = " + std::to_string(rows) +
                                  ", dim = " + std::to_string(dim) +
                                  "; expected rows >= 1 and dim >= 1");
    }
    const Index rb = quantized_row_bytes(format, dim);
    if (stride < 0) stride = rb;
    if (stride < rb) {
      throw std::invalid_argument(std::string(who) + ": stride = " + std::to_string(stride) +
                                  " bytes; expected at least the " + std::to_string(rb) +
                                  " bytes of a " + dtype_name(format) + " row of " +
                                  std::to_string(dim) + " values");
    }
    detail::checked_mul(who, "rows x stride bytes", rows, stride);
    return stride;
  }
  void copy_from(const QuantizedTable& o) {
    if (o.owns_storage()) {
      storage_ = o.storage_;
      data_ = storage_.data();
    } else {
      storage_ = detail::AlignedBuffer<std::uint8_t>();
      data_ = o.data_;
    }
  }

  detail::AlignedBuffer<std::uint8_t> storage_;
  std::uint8_t* data_ = nullptr;
  Dtype format_ = Dtype::int8_rowwise;
  Index rows_ = 0;
  Index dim_ = 0;
  Index stride_ = 0;
};

/// The lowest row of `table` that does not decode to finite values (a NaN or infinite scale or
/// bias, or an fp8 NaN code), or -1 when every row is valid. Like first_non_finite_row, pkm
/// runs it on the tables it copies from files, not on mapped ones (that would read them all).
inline Index first_invalid_row(const QuantizedTable& table) {
  constexpr Index kBlock = 1024;
  const Index rows = table.rows();
  std::vector<Index> first(static_cast<std::size_t>((rows + kBlock - 1) / kBlock), -1);
  detail::parallel_blocks(rows, kBlock, [&](Index r0, Index r1) {
    for (Index r = r0; r < r1; ++r) {
      if (!quantized_row_valid(table.format(), table.row(r), table.dim())) {
        first[static_cast<std::size_t>(r0 / kBlock)] = r;
        return;
      }
    }
  });
  for (Index f : first) {
    if (f >= 0) return f;
  }
  return -1;
}

/// Quantizes `table` row by row (see quantize_row) into `out`, a table of the same rows and
/// dim in any format (owned, or a view of the caller's memory: a tensor, a file's bytes).
/// Throws std::invalid_argument naming the lowest row that cannot be quantized (NaN,
/// infinity, int4 out of range); then `out` may hold some rows already. The input is never
/// changed.
template <class T>
void quantize(const ValueTable<T>& table, QuantizedTable& out) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, bf16> || std::is_same_v<T, fp16>,
                "pkm::quantize: tables of float, bf16 or fp16");
  if (out.rows() != table.rows() || out.dim() != table.dim()) {
    throw std::invalid_argument("pkm::quantize: out is " + std::to_string(out.rows()) + " x " +
                                std::to_string(out.dim()) + ", expected the table's " +
                                std::to_string(table.rows()) + " x " +
                                std::to_string(table.dim()));
  }
  constexpr Index kBlock = 1024;
  const Index rows = table.rows();
  std::vector<std::string> errors(static_cast<std::size_t>((rows + kBlock - 1) / kBlock));
  detail::parallel_blocks(rows, kBlock, [&](Index r0, Index r1) {
    for (Index r = r0; r < r1; ++r) {
      try {
        quantize_row(out.format(), table.row(r), table.dim(), out.row(r), r);
      } catch (const std::invalid_argument& e) {
        errors[static_cast<std::size_t>(r0 / kBlock)] = e.what();
        return;
      }
    }
  });
  for (const std::string& e : errors) {
    if (!e.empty()) throw std::invalid_argument(e);
  }
}

/// The table quantized row by row to `format` (see quantize_row), from a table of float, bf16
/// or fp16. Throws std::invalid_argument naming the lowest row that cannot be quantized
/// (NaN, infinity, int4 out of range); the input is never changed.
template <class T>
QuantizedTable quantize(const ValueTable<T>& table, Dtype format) {
  detail::check_quantized_format("pkm::quantize", format);
  QuantizedTable out(format, table.rows(), table.dim());
  quantize(table, out);
  return out;
}

/// The table's values as an fp32 table (dequantize_row of every row): for checking a
/// quantization, never needed to serve one.
inline ValueTable<float> dequantize(const QuantizedTable& table) {
  ValueTable<float> out(table.rows(), table.dim());
  detail::parallel_blocks(table.rows(), 1024, [&](Index r0, Index r1) {
    for (Index r = r0; r < r1; ++r) dequantize_row(table.format(), table.row(r), table.dim(), out.row(r));
  });
  return out;
}

}  // namespace pkm
