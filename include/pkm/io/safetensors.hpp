// pkm/io/safetensors.hpp — read and write the safetensors format: an 8-byte little-endian
// header length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}},
// then the raw little-endian tensor data.
//
// Reading checks every number of the header before it is used — the header length against
// the file, the JSON's nesting depth (before any recursive code sees it), each tensor's byte
// range against the data, the range's length against its dtype and shape (checked
// arithmetic, no wrapping), and the ranges against each other (no overlap). A malformed file
// throws std::runtime_error naming the file and the tensor, with any value from the file
// clipped in the message; nothing is read out of bounds.
//
// The file is also mapped (copy-on-write), for bytes() / mutable_bytes() and the zero-copy
// load_layer_mapped. The contract of a mapping: the file must not be truncated while a
// SafetensorsFile (or a layer viewing its mapping) is alive — reading a page past the new end
// of a mapped file raises SIGBUS, for pkm as for any program. read() does not go through the
// mapping: it copies with pread(), so a file truncated under it gives std::runtime_error, not
// a crash. pkm's own writer never truncates in place: it writes a temporary file and renames
// it over the target, so a mapped old version stays intact.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

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
      const auto p = d < 0 ? std::nullopt : pkm::detail::product_within(n, static_cast<std::uint64_t>(d));
      if (!p) throw std::out_of_range("pkm::io::TensorInfo: shape " + io::shape_string(shape) + " of '" + name + "' overflows");
      n = *p;
    }
    return static_cast<std::int64_t>(n);
  }
  std::string shape_string() const { return io::shape_string(shape); }
};

namespace detail {
inline std::uint16_t load_u16(const std::uint8_t* p) { return std::uint16_t(p[0] | (p[1] << 8)); }

/// Element i of a tensor's bytes, converted to T (unaligned-safe, little-endian host).
template <class T>
T load_element(const std::uint8_t* p, Dtype d, std::size_t i) {
  switch (d) {
    case Dtype::f32: { float v; std::memcpy(&v, p + 4 * i, 4); return static_cast<T>(v); }
    case Dtype::f64: { double v; std::memcpy(&v, p + 8 * i, 8); return static_cast<T>(v); }
    case Dtype::bf16: {
      bf16 v;
      std::memcpy(&v, p + 2 * i, 2);
      if constexpr (std::is_same_v<T, bf16>) return v;
      else return static_cast<T>(static_cast<float>(v));
    }
    case Dtype::f16: {
      fp16 v;
      std::memcpy(&v, p + 2 * i, 2);
      if constexpr (std::is_same_v<T, fp16>) return v;
      else return static_cast<T>(static_cast<float>(v));
    }
    case Dtype::i64: { std::int64_t v; std::memcpy(&v, p + 8 * i, 8); return static_cast<T>(v); }
    case Dtype::i32: { std::int32_t v; std::memcpy(&v, p + 4 * i, 4); return static_cast<T>(v); }
  }
  return T{};
}

/// Owns the bytes of a file: a private mapping plus the open descriptor (copies are read
/// with pread), or a vector.
struct Bytes {
  std::uint8_t* data = nullptr;
  std::size_t size = 0;
  std::vector<std::uint8_t> owned;
  bool mapped = false;
  int fd = -1;
  Bytes() = default;
  Bytes(const Bytes&) = delete;
  Bytes& operator=(const Bytes&) = delete;
  ~Bytes() {
    if (mapped && data) munmap(data, size);
    if (fd >= 0) ::close(fd);
  }
};

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
      if (escaped) escaped = false;
      else if (ch == '\\') escaped = true;
      else if (ch == '"') in_string = false;
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
    if (c < 0x80) { ++i; continue; }
    if ((c & 0xE0) == 0xC0) { len = 2; cp = c & 0x1F; }
    else if ((c & 0xF0) == 0xE0) { len = 3; cp = c & 0x0F; }
    else if ((c & 0xF8) == 0xF0) { len = 4; cp = c & 0x07; }
    else return false;
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

/// A safetensors file, mapped and validated. Copies share the mapping.
class SafetensorsFile {
 public:
  /// Maps and validates `path`. Throws std::runtime_error naming the file on any problem.
  explicit SafetensorsFile(const std::string& path) : label_(path) {
    auto bytes = std::make_shared<detail::Bytes>();
    bytes->fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (bytes->fd < 0) fail(std::string("cannot open: ") + std::strerror(errno));
    struct stat st {};
    if (::fstat(bytes->fd, &st) != 0) fail(std::string("cannot stat: ") + std::strerror(errno));
    if (!S_ISREG(st.st_mode)) fail("not a regular file");
    bytes->size = static_cast<std::size_t>(st.st_size);
    if (bytes->size > 0) {
      void* p = ::mmap(nullptr, bytes->size, PROT_READ | PROT_WRITE, MAP_PRIVATE, bytes->fd, 0);
      if (p == MAP_FAILED) fail(std::string("cannot map: ") + std::strerror(errno));
      bytes->data = static_cast<std::uint8_t*>(p);
      bytes->mapped = true;
    }
    bytes_ = std::move(bytes);
    parse();
  }

  /// Validates a file held in memory; `label` names it in error messages.
  static SafetensorsFile from_bytes(std::vector<std::uint8_t> data, std::string label) {
    SafetensorsFile f;
    f.label_ = std::move(label);
    auto bytes = std::make_shared<detail::Bytes>();
    bytes->owned = std::move(data);
    bytes->data = bytes->owned.data();
    bytes->size = bytes->owned.size();
    f.bytes_ = std::move(bytes);
    f.parse();
    return f;
  }

  const std::string& path() const { return label_; }
  /// Tensors sorted by name.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  bool has(const std::string& name) const { return find(name) != nullptr; }

  const TensorInfo& info(const std::string& name) const {
    const TensorInfo* t = find(name);
    if (t == nullptr) {
      throw std::out_of_range(label_ + ": no tensor '" + detail::clip(name) + "' in the file");
    }
    return *t;
  }

  /// The raw bytes of a tensor (little-endian; not necessarily aligned to the element size).
  const std::uint8_t* bytes(const TensorInfo& t) const { return data_begin() + t.begin; }
  /// Writable raw bytes: the mapping is private, so writes never reach the file.
  std::uint8_t* mutable_bytes(const TensorInfo& t) { return data_begin() + t.begin; }

  /// Converts the tensor's elements into `out` (count must equal its element count). Floats
  /// convert among F32/F64/BF16/F16, integers among I64/I32; float <-> integer is refused.
  /// Copies with pread (see the contract above), never through the mapping.
  template <class T>
  void read(const std::string& name, T* out, std::size_t count) const {
    const TensorInfo& t = checked_info<T>(name, count);
    if (count == 0) return;  // out may be null for an empty tensor
    if (t.dtype == dtype_of<T>()) {
      copy_out(t.begin, out, count * sizeof(T), name);
      return;
    }
    visit<T>(name, [&](const T* v, std::size_t first, std::size_t n) { std::copy(v, v + n, out + first); });
  }

  /// Calls fn(values, first, n) for consecutive chunks of the tensor's elements converted to
  /// T (values[i] is element first + i): for checking values without holding a copy.
  template <class T, class F>
  void visit(const std::string& name, F&& fn) const {
    const TensorInfo& t = info(name);
    const std::size_t count = static_cast<std::size_t>(t.numel());
    checked_info<T>(name, count);
    constexpr std::size_t kChunk = 16384;
    const std::size_t esize = dtype_size(t.dtype);
    std::vector<std::uint8_t> buf(std::min(count, kChunk) * esize);
    std::vector<T> values(std::min(count, kChunk));
    for (std::size_t i0 = 0; i0 < count; i0 += kChunk) {
      const std::size_t len = std::min(kChunk, count - i0);
      copy_out(t.begin + i0 * esize, buf.data(), len * esize, name);
      for (std::size_t i = 0; i < len; ++i) values[i] = detail::load_element<T>(buf.data(), t.dtype, i);
      fn(static_cast<const T*>(values.data()), i0, len);
    }
  }
  template <class T>
  std::vector<T> read(const std::string& name) const {
    std::vector<T> v(static_cast<std::size_t>(info(name).numel()));
    read(name, v.data(), v.size());
    return v;
  }

 private:
  SafetensorsFile() = default;

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("safetensors file '" + label_ + "': " + what);
  }
  [[noreturn]] void fail_tensor(const std::string& name, const std::string& what) const {
    fail("tensor '" + detail::clip(name) + "': " + what);
  }
  /// The tensor, checked to hold `count` elements of a dtype convertible to T.
  template <class T>
  const TensorInfo& checked_info(const std::string& name, std::size_t count) const {
    const TensorInfo& t = info(name);
    if (static_cast<std::size_t>(t.numel()) != count) {
      throw std::invalid_argument(label_ + ": tensor '" + detail::clip(name) + "' has " +
                                  std::to_string(t.numel()) + " elements, expected " + std::to_string(count));
    }
    constexpr bool want_float = is_float(dtype_of<T>());
    if (want_float != is_float(t.dtype)) {
      throw std::invalid_argument(label_ + ": tensor '" + detail::clip(name) + "' has dtype " +
                                  dtype_name(t.dtype) + ", expected " +
                                  (want_float ? "a float dtype (F32, F64, BF16, F16)" : "an integer dtype (I64, I32)"));
    }
    return t;
  }
  const TensorInfo* find(const std::string& name) const {
    auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                               [](const TensorInfo& t, const std::string& n) { return t.name < n; });
    return (it != tensors_.end() && it->name == name) ? &*it : nullptr;
  }
  std::uint8_t* data_begin() const { return bytes_->data + 8 + header_size_; }

  /// Copies `n` bytes at `offset` of the file (pread: a file shorter than when it was opened
  /// gives std::runtime_error, never SIGBUS) or of the in-memory bytes.
  void read_at(std::uint64_t offset, void* dst, std::size_t n, const std::string& what) const {
    if (bytes_->fd < 0) {
      if (n) std::memcpy(dst, bytes_->data + offset, n);
      return;
    }
    auto* out = static_cast<std::uint8_t*>(dst);
    std::size_t done = 0;
    while (done < n) {
      const ssize_t r = ::pread(bytes_->fd, out + done, n - done, static_cast<off_t>(offset + done));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) {
        fail(what + ": the file ended (or failed to read: " + std::string(r < 0 ? std::strerror(errno) : "end of file") +
             ") at byte " + std::to_string(offset + done) + " of the " + std::to_string(bytes_->size) +
             " it had when opened; it was changed while in use");
      }
      done += static_cast<std::size_t>(r);
    }
  }
  void copy_out(std::uint64_t data_offset, void* dst, std::size_t n, const std::string& name) const {
    read_at(8 + header_size_ + data_offset, dst, n, "tensor '" + detail::clip(name) + "'");
  }

  void parse() {
    const std::size_t size = bytes_->size;
    if (size < 8) fail("truncated: " + std::to_string(size) + " bytes, the header length alone needs 8");
    std::uint8_t len[8];
    read_at(0, len, 8, "header length");
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | len[i];
    if (n > kMaxHeaderBytes) fail("header length " + std::to_string(n) + " is over the limit of " + std::to_string(kMaxHeaderBytes) + " bytes");
    if (n > size - 8) fail("header length " + std::to_string(n) + " runs past the end of the file (" + std::to_string(size) + " bytes)");
    header_size_ = n;
    const std::uint64_t data_size = size - 8 - n;
    std::vector<std::uint8_t> text(static_cast<std::size_t>(n));
    read_at(8, text.data(), text.size(), "header");
    // Bound the nesting before nlohmann sees the text: its dump() and (older releases) its
    // destructor recurse once per level.
    const int depth = detail::json_depth(text.data(), text.size(), kMaxHeaderDepth);
    if (depth > kMaxHeaderDepth) {
      fail("header nests JSON more than " + std::to_string(kMaxHeaderDepth) + " levels deep; a safetensors header needs 3");
    }
    nlohmann::json header;
    try {
      header = nlohmann::json::parse(text.begin(), text.end());
    } catch (const nlohmann::json::exception& e) {
      fail("header is not valid JSON: " + detail::clip(e.what(), 200));
    }
    if (!header.is_object()) fail("header is not a JSON object");
    for (auto it = header.begin(); it != header.end(); ++it) {
      const std::string& name = it.key();
      const nlohmann::json& v = it.value();
      if (name == "__metadata__") {
        if (!v.is_object()) fail("__metadata__ is not an object of strings");
        for (auto m = v.begin(); m != v.end(); ++m) {
          if (!m.value().is_string()) fail("__metadata__ value of '" + detail::clip(m.key()) + "' is not a string");
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      if (!v.is_object()) fail_tensor(name, "entry is not an object");
      TensorInfo t;
      t.name = name;
      const auto dt = v.find("dtype");
      if (dt == v.end() || !dt->is_string()) fail_tensor(name, "missing dtype");
      const auto parsed = parse_dtype(dt->get<std::string>());
      if (!parsed) fail_tensor(name, "unknown dtype '" + detail::clip(dt->get<std::string>()) + "'; expected F32, F64, BF16, F16, I64 or I32");
      t.dtype = *parsed;
      const auto sh = v.find("shape");
      if (sh == v.end() || !sh->is_array()) fail_tensor(name, "missing shape");
      if (sh->size() > 64) fail_tensor(name, "shape has " + std::to_string(sh->size()) + " dimensions; expected at most 64");
      // numel x element size within 2^62 bytes, every product checked before it is formed.
      std::optional<std::uint64_t> bytes_needed = dtype_size(t.dtype);
      for (const auto& d : *sh) {
        if (!d.is_number_unsigned()) fail_tensor(name, "shape entry " + detail::describe(d) + " is not a non-negative integer");
        const std::uint64_t dim = d.get<std::uint64_t>();
        if (dim > pkm::detail::kMaxBytes) fail_tensor(name, "shape entry " + std::to_string(dim) + " is over the limit of 2^62");
        if (bytes_needed) bytes_needed = pkm::detail::product_within(*bytes_needed, dim);
        t.shape.push_back(static_cast<std::int64_t>(dim));
      }
      if (!bytes_needed) {
        fail_tensor(name, "shape " + detail::clip(t.shape_string()) + " of " + dtype_name(t.dtype) +
                              " needs more than 2^62 bytes");
      }
      const auto off = v.find("data_offsets");
      if (off == v.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
          !(*off)[1].is_number_unsigned()) {
        fail_tensor(name, "data_offsets must be [begin, end] of non-negative integers");
      }
      t.begin = (*off)[0].get<std::uint64_t>();
      t.end = (*off)[1].get<std::uint64_t>();
      if (t.begin > t.end || t.end > data_size) {
        fail_tensor(name, "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                              "] are outside the data section of " + std::to_string(data_size) + " bytes");
      }
      const std::uint64_t want = *bytes_needed;
      if (t.end - t.begin != want) {
        fail_tensor(name, "shape " + detail::clip(t.shape_string()) + " of " + dtype_name(t.dtype) + " needs " +
                              std::to_string(want) + " bytes, but data_offsets span " +
                              std::to_string(t.end - t.begin));
      }
      tensors_.push_back(std::move(t));
    }
    // No two tensors may share bytes.
    std::vector<const TensorInfo*> by_offset;
    for (const auto& t : tensors_) by_offset.push_back(&t);
    std::sort(by_offset.begin(), by_offset.end(), [](const TensorInfo* a, const TensorInfo* b) {
      return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
    });
    for (std::size_t i = 1; i < by_offset.size(); ++i) {
      const TensorInfo* a = by_offset[i - 1];
      const TensorInfo* b = by_offset[i];
      if (b->begin < a->end) {
        fail_tensor(b->name, "data_offsets [" + std::to_string(b->begin) + ", " + std::to_string(b->end) +
                                 "] overlap those of '" + detail::clip(a->name) + "'");
      }
    }
    std::sort(tensors_.begin(), tensors_.end(),
              [](const TensorInfo& a, const TensorInfo& b) { return a.name < b.name; });
  }

  std::string label_;
  std::shared_ptr<detail::Bytes> bytes_;
  std::uint64_t header_size_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

/// Collects tensors (by pointer: the data must stay valid until write) and writes a file.
/// Tensors are laid out in name order, the header padded with spaces to 8 bytes. What it
/// writes, SafetensorsFile reads: add() refuses shapes over 2^62 bytes, names and metadata
/// that are not UTF-8, and anything else the reader would reject.
class SafetensorsWriter {
 public:
  void add(const std::string& name, Dtype dtype, std::vector<std::int64_t> shape, const void* data) {
    const char* who = "pkm::io::SafetensorsWriter::add";
    if (name.empty() || name == "__metadata__") {
      throw std::invalid_argument(std::string(who) + ": invalid tensor name '" + name + "'");
    }
    check_utf8(who, "tensor name", name);
    if (entries_.count(name)) {
      throw std::invalid_argument(std::string(who) + ": tensor '" + detail::clip(name) + "' added twice");
    }
    if (shape.size() > 64) {
      throw std::invalid_argument(std::string(who) + ": tensor '" + detail::clip(name) + "' has " +
                                  std::to_string(shape.size()) + " dimensions; expected at most 64");
    }
    std::optional<std::uint64_t> bytes = dtype_size(dtype);
    for (auto d : shape) {
      if (d < 0) {
        throw std::invalid_argument(std::string(who) + ": tensor '" + detail::clip(name) + "' has shape " +
                                    detail::clip(shape_string(shape)) + "; expected dimensions >= 0");
      }
      if (bytes) bytes = pkm::detail::product_within(*bytes, static_cast<std::uint64_t>(d));
    }
    if (!bytes) {
      throw std::invalid_argument(std::string(who) + ": tensor '" + detail::clip(name) + "' of shape " +
                                  detail::clip(shape_string(shape)) + " needs more than 2^62 bytes");
    }
    if (*bytes > 0 && data == nullptr) {
      throw std::invalid_argument(std::string(who) + ": tensor '" + detail::clip(name) + "' has null data");
    }
    entries_[name] = Entry{dtype, std::move(shape), data, *bytes};
  }
  template <class T>
  void add(const std::string& name, std::vector<std::int64_t> shape, const T* data) {
    add(name, dtype_of<T>(), std::move(shape), data);
  }
  void set_metadata(const std::string& key, const std::string& value) {
    const char* who = "pkm::io::SafetensorsWriter::set_metadata";
    check_utf8(who, "metadata key", key);
    check_utf8(who, ("metadata value of '" + detail::clip(key) + "'").c_str(), value);
    metadata_[key] = value;
  }

  /// The header JSON, padded to a multiple of 8 bytes.
  std::string header() const {
    nlohmann::json h = nlohmann::json::object();
    if (!metadata_.empty()) h["__metadata__"] = metadata_;
    std::uint64_t offset = 0;
    for (const auto& [name, e] : entries_) {
      if (e.bytes > pkm::detail::kMaxBytes - offset) {
        throw std::invalid_argument("pkm::io::SafetensorsWriter: the tensors add up to more than 2^62 bytes");
      }
      h[name] = {{"dtype", dtype_name(e.dtype)}, {"shape", e.shape}, {"data_offsets", {offset, offset + e.bytes}}};
      offset += e.bytes;
    }
    std::string s = h.dump();  // every string was checked to be UTF-8 when added
    s.append((8 - s.size() % 8) % 8, ' ');
    if (s.size() > kMaxHeaderBytes) {
      throw std::invalid_argument("pkm::io::SafetensorsWriter: the header would be " + std::to_string(s.size()) +
                                  " bytes, over the readers' limit of " + std::to_string(kMaxHeaderBytes));
    }
    return s;
  }

  /// Writes the file to `path` atomically: into a new temporary file in the same folder,
  /// flushed and fsync'd, then renamed over `path` (and the folder fsync'd). Until the rename
  /// an existing file at `path` is untouched, and on any failure it stays as it was and the
  /// temporary file is removed. A file that is replaced keeps its permissions; a symbolic
  /// link at `path` is replaced by the new file (its target is left alone). The tensors are streamed, not copied first. Throws
  /// std::invalid_argument (before creating anything) for a header it cannot write, and
  /// std::runtime_error naming the path and the system error for a failed write.
  void write(const std::string& path) const {
    const std::string h = header();  // may throw: nothing created yet
    const char* who = "pkm::io::SafetensorsWriter::write";
    // A new file of a name no one else uses, created as open(O_CREAT) would create the target
    // (mode 0666 less the umask, as std::ofstream does).
    std::random_device entropy;
    std::string tmp;
    int fd = -1;
    for (int attempt = 0; attempt < 16 && fd < 0; ++attempt) {
      char suffix[64];
      std::snprintf(suffix, sizeof suffix, ".tmp-%ld-%08x", static_cast<long>(::getpid()),
                    static_cast<unsigned>(entropy()));
      tmp = path + suffix;
      fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
      if (fd < 0 && errno != EEXIST) break;
    }
    if (fd < 0) {
      throw std::runtime_error(std::string(who) + ": cannot create a temporary file next to '" + path +
                               "': " + std::strerror(errno));
    }
    auto fail = [&](const std::string& what) {
      const int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      throw std::runtime_error(std::string(who) + ": " + what + " '" + path + "' failed: " + std::strerror(err) +
                               " (the previous file, if any, is unchanged)");
    };
    // A file being replaced keeps its permissions.
    struct stat target {};
    if (::stat(path.c_str(), &target) == 0 && S_ISREG(target.st_mode) &&
        ::fchmod(fd, target.st_mode & 07777) != 0) {
      fail("setting the permissions of the file replacing");
    }
    bool ok = true;
    emit(h, [&](const void* p, std::size_t n) {
      const auto* b = static_cast<const std::uint8_t*>(p);
      while (ok && n > 0) {
        const ssize_t r = ::write(fd, b, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) { ok = false; break; }
        b += r;
        n -= static_cast<std::size_t>(r);
      }
    });
    if (!ok) fail("writing");
    if (::fsync(fd) != 0) fail("flushing");
    if (::close(fd) != 0) {
      const int err = errno;
      ::unlink(tmp.c_str());
      throw std::runtime_error(std::string(who) + ": closing '" + path + "' failed: " + std::strerror(err));
    }
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
      const int err = errno;
      ::unlink(tmp.c_str());
      throw std::runtime_error(std::string(who) + ": renaming the new file over '" + path + "' failed: " +
                               std::strerror(err) + " (the previous file, if any, is unchanged)");
    }
    // Make the rename itself durable.
    const auto slash = path.find_last_of('/');
    const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      (void)::fsync(dfd);
      ::close(dfd);
    }
  }

  /// The whole file in memory.
  std::vector<std::uint8_t> to_bytes() const {
    std::vector<std::uint8_t> bytes;
    emit(header(), [&](const void* p, std::size_t n) {
      const auto* b = static_cast<const std::uint8_t*>(p);
      bytes.insert(bytes.end(), b, b + n);
    });
    return bytes;
  }

 private:
  static void check_utf8(const char* who, const char* what, const std::string& s) {
    if (!detail::valid_utf8(s)) {
      throw std::invalid_argument(std::string(who) + ": the " + what +
                                  " is not valid UTF-8; expected UTF-8 text (JSON headers hold nothing else)");
    }
  }
  template <class Sink>
  void emit(const std::string& h, Sink&& sink) const {
    std::uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = std::uint8_t((std::uint64_t(h.size()) >> (8 * i)) & 0xff);
    sink(len, 8);
    sink(h.data(), h.size());
    for (const auto& [name, e] : entries_) {
      if (e.bytes > 0) sink(e.data, static_cast<std::size_t>(e.bytes));
    }
  }

  struct Entry {
    Dtype dtype;
    std::vector<std::int64_t> shape;
    const void* data;
    std::uint64_t bytes;
  };
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace pkm::io
