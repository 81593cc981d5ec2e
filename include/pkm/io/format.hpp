// pkm/io/format.hpp — the safetensors format as pkm reads and writes it: an 8-byte
// little-endian header length, a JSON header {name: {dtype, shape, data_offsets},
// "__metadata__": {...}}, then the raw little-endian tensor data. The limits, the tensor
// description and the checks the reader (pkm/io/safetensors_file.hpp) and the writer
// (pkm/io/safetensors_writer.hpp) share.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include "pkm/detail/checked.hpp"
#include "pkm/types.hpp"

namespace pkm::io {

/// The element types pkm reads and writes: pkm::Dtype (pkm/dtype.hpp), under the names io
/// code has always used.
using Dtype = pkm::Dtype;
using pkm::dtype_name;
using pkm::dtype_of;
using pkm::dtype_size;
using pkm::is_float;
using pkm::parse_dtype;

/// Largest header accepted (the limit of the reference implementation).
inline constexpr std::uint64_t kMaxHeaderBytes = std::uint64_t{100} << 20;

/// A shape as "[d0, d1, ...]", for error messages.
inline std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

/// One tensor of a file: its byte range is [begin, end) of the data section.
struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::f32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;

  /// Product of the shape (a file's shapes are checked to stay within 2^62 bytes on parse).
  std::int64_t numel() const {
    std::uint64_t n = 1;
    for (auto d : shape) {
      const auto p =
          d < 0 ? std::nullopt : pkm::detail::product_within(n, static_cast<std::uint64_t>(d));
      if (!p)
        throw std::out_of_range("pkm::io::TensorInfo: shape " + io::shape_string(shape) + " of '" +
                                name + "' overflows");
      n = *p;
    }
    return static_cast<std::int64_t>(n);
  }
  std::string shape_string() const { return io::shape_string(shape); }
};

namespace detail {
/// Element i of a tensor's bytes, converted to T (unaligned-safe, little-endian host).
template <class T>
T load_element(const std::uint8_t* p, Dtype d, std::size_t i) {
  switch (d) {
    case Dtype::f32: {
      float v;
      std::memcpy(&v, p + 4 * i, 4);
      return static_cast<T>(v);
    }
    case Dtype::f64: {
      double v;
      std::memcpy(&v, p + 8 * i, 8);
      return static_cast<T>(v);
    }
    case Dtype::bf16: {
      bf16 v;
      std::memcpy(&v, p + 2 * i, 2);
      if constexpr (std::is_same_v<T, bf16>)
        return v;
      else
        return static_cast<T>(static_cast<float>(v));
    }
    case Dtype::f16: {
      fp16 v;
      std::memcpy(&v, p + 2 * i, 2);
      if constexpr (std::is_same_v<T, fp16>)
        return v;
      else
        return static_cast<T>(static_cast<float>(v));
    }
    case Dtype::i64: {
      std::int64_t v;
      std::memcpy(&v, p + 8 * i, 8);
      return static_cast<T>(v);
    }
    case Dtype::i32: {
      std::int32_t v;
      std::memcpy(&v, p + 4 * i, 4);
      return static_cast<T>(v);
    }
    case Dtype::u8:
      return static_cast<T>(p[i]);
    case Dtype::int8_rowwise:  // never a tensor's dtype (the parser takes element dtypes only)
    case Dtype::int4_rowwise:
    case Dtype::fp8_rowwise:
      break;
  }
  return T{};
}

/// At most `max` characters of `s`, with a note of how many were left out (error messages
/// never carry an unbounded value from a file).
inline std::string clip(const std::string& s, std::size_t max = 96) {
  if (s.size() <= max) return s;
  return s.substr(0, max) + "... (" + std::to_string(s.size()) + " characters)";
}

/// A short description of a JSON value for messages: scalars clipped, containers by size.
inline std::string describe(const nlohmann::json& v) {
  if (v.is_array()) return "an array of " + std::to_string(v.size()) + " entries";
  if (v.is_object()) return "an object of " + std::to_string(v.size()) + " entries";
  if (v.is_string()) return "the string \"" + clip(v.get_ref<const std::string&>(), 48) + "\"";
  return clip(v.dump(), 48);  // a number, a boolean or null: short, and not recursive
}

/// Deepest nesting of JSON text (arrays and objects, outside strings); stops counting past
/// `limit`. Runs before the parser so no recursive code ever sees a deeper document.
inline int json_depth(const std::uint8_t* p, std::size_t n, int limit) {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (std::size_t i = 0; i < n; ++i) {
    const char ch = static_cast<char>(p[i]);
    if (in_string) {
      if (escaped)
        escaped = false;
      else if (ch == '\\')
        escaped = true;
      else if (ch == '"')
        in_string = false;
    } else if (ch == '"') {
      in_string = true;
    } else if (ch == '[' || ch == '{') {
      if (++depth > deepest) deepest = depth;
      if (deepest > limit) return deepest;
    } else if (ch == ']' || ch == '}') {
      --depth;
    }
  }
  return deepest;
}

/// True when `s` is valid UTF-8 (what JSON text must be; nlohmann refuses anything else).
inline bool valid_utf8(const std::string& s) {
  std::size_t i = 0;
  const std::size_t n = s.size();
  while (i < n) {
    const auto c = static_cast<unsigned char>(s[i]);
    std::size_t len = 0;
    std::uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    }
    if ((c & 0xE0) == 0xC0) {
      len = 2;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      cp = c & 0x07;
    } else
      return false;
    if (i + len > n) return false;
    for (std::size_t k = 1; k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    // No overlong forms, no surrogates, nothing past U+10FFFF.
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF) {
      return false;
    }
    i += len;
  }
  return true;
}
}  // namespace detail

/// Deepest JSON nesting a header may have (a safetensors header needs 3).
inline constexpr int kMaxHeaderDepth = 16;

}  // namespace pkm::io
