// pkm/io/safetensors.hpp — read and write the safetensors format: an 8-byte little-endian
// header length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}},
// then the raw little-endian tensor data.
//
// Reading maps the file (copy-on-write: a view into it may be modified without changing the
// file) and checks every number of the header before it is used — the header length against
// the file, each tensor's byte range against the data, the range's length against its dtype
// and shape (without overflow), and the ranges against each other (no overlap). A malformed
// file throws std::runtime_error naming the file and the tensor; nothing is read out of bounds.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "pkm/types.hpp"

namespace pkm::io {

/// The element types pkm reads and writes.
enum class Dtype { F32, F64, BF16, F16, I64, I32 };

inline std::size_t dtype_size(Dtype d) {
  switch (d) {
    case Dtype::F32: return 4;
    case Dtype::F64: return 8;
    case Dtype::BF16: return 2;
    case Dtype::F16: return 2;
    case Dtype::I64: return 8;
    case Dtype::I32: return 4;
  }
  return 0;
}

inline const char* dtype_name(Dtype d) {
  switch (d) {
    case Dtype::F32: return "F32";
    case Dtype::F64: return "F64";
    case Dtype::BF16: return "BF16";
    case Dtype::F16: return "F16";
    case Dtype::I64: return "I64";
    case Dtype::I32: return "I32";
  }
  return "?";
}

inline std::optional<Dtype> parse_dtype(const std::string& s) {
  for (Dtype d : {Dtype::F32, Dtype::F64, Dtype::BF16, Dtype::F16, Dtype::I64, Dtype::I32})
    if (s == dtype_name(d)) return d;
  return std::nullopt;
}

constexpr bool is_float(Dtype d) { return d == Dtype::F32 || d == Dtype::F64 || d == Dtype::BF16 || d == Dtype::F16; }

/// The dtype a C++ element type is stored as.
template <class T>
constexpr Dtype dtype_of() {
  if constexpr (std::is_same_v<T, float>) return Dtype::F32;
  else if constexpr (std::is_same_v<T, double>) return Dtype::F64;
  else if constexpr (std::is_same_v<T, bf16>) return Dtype::BF16;
  else if constexpr (std::is_same_v<T, fp16>) return Dtype::F16;
  else if constexpr (std::is_same_v<T, std::int64_t>) return Dtype::I64;
  else {
    static_assert(std::is_same_v<T, std::int32_t>, "pkm::io: unsupported element type");
    return Dtype::I32;
  }
}

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
  Dtype dtype = Dtype::F32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
  std::string shape_string() const { return io::shape_string(shape); }
};

namespace detail {
inline std::uint16_t load_u16(const std::uint8_t* p) { return std::uint16_t(p[0] | (p[1] << 8)); }

/// Element i of a tensor's bytes, converted to T (unaligned-safe, little-endian host).
template <class T>
T load_element(const std::uint8_t* p, Dtype d, std::size_t i) {
  switch (d) {
    case Dtype::F32: { float v; std::memcpy(&v, p + 4 * i, 4); return static_cast<T>(v); }
    case Dtype::F64: { double v; std::memcpy(&v, p + 8 * i, 8); return static_cast<T>(v); }
    case Dtype::BF16: {
      bf16 v;
      std::memcpy(&v, p + 2 * i, 2);
      if constexpr (std::is_same_v<T, bf16>) return v;
      else return static_cast<T>(static_cast<float>(v));
    }
    case Dtype::F16: {
      fp16 v;
      std::memcpy(&v, p + 2 * i, 2);
      if constexpr (std::is_same_v<T, fp16>) return v;
      else return static_cast<T>(static_cast<float>(v));
    }
    case Dtype::I64: { std::int64_t v; std::memcpy(&v, p + 8 * i, 8); return static_cast<T>(v); }
    case Dtype::I32: { std::int32_t v; std::memcpy(&v, p + 4 * i, 4); return static_cast<T>(v); }
  }
  return T{};
}

/// Owns the bytes of a file: a private mapping, or a vector.
struct Bytes {
  std::uint8_t* data = nullptr;
  std::size_t size = 0;
  std::vector<std::uint8_t> owned;
  bool mapped = false;
  Bytes() = default;
  Bytes(const Bytes&) = delete;
  Bytes& operator=(const Bytes&) = delete;
  ~Bytes() {
    if (mapped && data) munmap(data, size);
  }
};
}  // namespace detail

/// A safetensors file, mapped and validated. Copies share the mapping.
class SafetensorsFile {
 public:
  /// Maps and validates `path`. Throws std::runtime_error naming the file on any problem.
  explicit SafetensorsFile(const std::string& path) : label_(path) {
    auto bytes = std::make_shared<detail::Bytes>();
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail(std::string("cannot open: ") + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      fail(std::string("cannot stat: ") + std::strerror(errno));
    }
    bytes->size = static_cast<std::size_t>(st.st_size);
    if (bytes->size > 0) {
      void* p = ::mmap(nullptr, bytes->size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        ::close(fd);
        fail(std::string("cannot map: ") + std::strerror(errno));
      }
      bytes->data = static_cast<std::uint8_t*>(p);
      bytes->mapped = true;
    }
    ::close(fd);
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
      throw std::out_of_range(label_ + ": no tensor '" + name + "' in the file");
    }
    return *t;
  }

  /// The raw bytes of a tensor (little-endian; not necessarily aligned to the element size).
  const std::uint8_t* bytes(const TensorInfo& t) const { return data_begin() + t.begin; }
  /// Writable raw bytes: the mapping is private, so writes never reach the file.
  std::uint8_t* mutable_bytes(const TensorInfo& t) { return data_begin() + t.begin; }

  /// Converts the tensor's elements into `out` (count must equal its element count). Floats
  /// convert among F32/F64/BF16/F16, integers among I64/I32; float <-> integer is refused.
  template <class T>
  void read(const std::string& name, T* out, std::size_t count) const {
    const TensorInfo& t = info(name);
    if (static_cast<std::size_t>(t.numel()) != count) {
      throw std::invalid_argument(label_ + ": tensor '" + name + "' has " +
                                  std::to_string(t.numel()) + " elements, expected " +
                                  std::to_string(count));
    }
    constexpr bool want_float = is_float(dtype_of<T>());
    if (want_float != is_float(t.dtype)) {
      throw std::invalid_argument(label_ + ": tensor '" + name + "' has dtype " +
                                  dtype_name(t.dtype) + ", expected " +
                                  (want_float ? "a float dtype (F32, F64, BF16, F16)"
                                              : "an integer dtype (I64, I32)"));
    }
    const std::uint8_t* p = bytes(t);
    if (t.dtype == dtype_of<T>()) {
      std::memcpy(out, p, count * sizeof(T));
    } else {
      for (std::size_t i = 0; i < count; ++i) out[i] = detail::load_element<T>(p, t.dtype, i);
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
    fail("tensor '" + name + "': " + what);
  }
  const TensorInfo* find(const std::string& name) const {
    auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                               [](const TensorInfo& t, const std::string& n) { return t.name < n; });
    return (it != tensors_.end() && it->name == name) ? &*it : nullptr;
  }
  std::uint8_t* data_begin() const { return bytes_->data + 8 + header_size_; }

  void parse() {
    const std::size_t size = bytes_->size;
    if (size < 8) fail("truncated: " + std::to_string(size) + " bytes, the header length alone needs 8");
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | bytes_->data[i];
    if (n > kMaxHeaderBytes) fail("header length " + std::to_string(n) + " is over the limit of " + std::to_string(kMaxHeaderBytes) + " bytes");
    if (n > size - 8) fail("header length " + std::to_string(n) + " runs past the end of the file (" + std::to_string(size) + " bytes)");
    header_size_ = n;
    const std::uint64_t data_size = size - 8 - n;
    nlohmann::json header;
    try {
      header = nlohmann::json::parse(bytes_->data + 8, bytes_->data + 8 + n);
    } catch (const nlohmann::json::exception& e) {
      fail(std::string("header is not valid JSON: ") + e.what());
    }
    if (!header.is_object()) fail("header is not a JSON object");
    for (auto it = header.begin(); it != header.end(); ++it) {
      const std::string& name = it.key();
      const nlohmann::json& v = it.value();
      if (name == "__metadata__") {
        if (!v.is_object()) fail("__metadata__ is not an object of strings");
        for (auto m = v.begin(); m != v.end(); ++m) {
          if (!m.value().is_string()) fail("__metadata__ value of '" + m.key() + "' is not a string");
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
      if (!parsed) fail_tensor(name, "unknown dtype '" + dt->get<std::string>() + "'; expected F32, F64, BF16, F16, I64 or I32");
      t.dtype = *parsed;
      const auto sh = v.find("shape");
      if (sh == v.end() || !sh->is_array()) fail_tensor(name, "missing shape");
      std::uint64_t numel = 1;
      for (const auto& d : *sh) {
        if (!d.is_number_unsigned()) fail_tensor(name, "shape entry " + d.dump() + " is not a non-negative integer");
        const std::uint64_t dim = d.get<std::uint64_t>();
        if (dim != 0 && numel > (std::uint64_t(1) << 62) / dim) fail_tensor(name, "shape " + sh->dump() + " overflows");
        numel *= dim;
        t.shape.push_back(static_cast<std::int64_t>(dim));
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
      const std::uint64_t want = numel * dtype_size(t.dtype);
      if (t.end - t.begin != want) {
        fail_tensor(name, "shape " + t.shape_string() + " of " + dtype_name(t.dtype) + " needs " +
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
                                 "] overlap those of '" + a->name + "'");
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
/// Tensors are laid out in name order, the header padded with spaces to 8 bytes.
class SafetensorsWriter {
 public:
  void add(const std::string& name, Dtype dtype, std::vector<std::int64_t> shape, const void* data) {
    if (name.empty() || name == "__metadata__") {
      throw std::invalid_argument("pkm::io::SafetensorsWriter: invalid tensor name '" + name + "'");
    }
    if (entries_.count(name)) {
      throw std::invalid_argument("pkm::io::SafetensorsWriter: tensor '" + name + "' added twice");
    }
    std::uint64_t numel = 1;
    for (auto d : shape) {
      if (d < 0) throw std::invalid_argument("pkm::io::SafetensorsWriter: tensor '" + name + "' has a negative dimension");
      numel *= static_cast<std::uint64_t>(d);
    }
    entries_[name] = Entry{dtype, std::move(shape), data, numel * dtype_size(dtype)};
  }
  template <class T>
  void add(const std::string& name, std::vector<std::int64_t> shape, const T* data) {
    add(name, dtype_of<T>(), std::move(shape), data);
  }
  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

  /// The header JSON, padded to a multiple of 8 bytes.
  std::string header() const {
    nlohmann::json h = nlohmann::json::object();
    if (!metadata_.empty()) h["__metadata__"] = metadata_;
    std::uint64_t offset = 0;
    for (const auto& [name, e] : entries_) {
      h[name] = {{"dtype", dtype_name(e.dtype)}, {"shape", e.shape}, {"data_offsets", {offset, offset + e.bytes}}};
      offset += e.bytes;
    }
    std::string s = h.dump();
    s.append((8 - s.size() % 8) % 8, ' ');
    return s;
  }

  /// Streams the file to `path` (the tensors are not copied first).
  void write(const std::string& path) const {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    if (!out) throw std::runtime_error("pkm::io::SafetensorsWriter: cannot open '" + path + "' for writing");
    emit([&](const void* p, std::size_t n) { out.write(static_cast<const char*>(p), static_cast<std::streamsize>(n)); });
    out.flush();
    if (!out) throw std::runtime_error("pkm::io::SafetensorsWriter: writing '" + path + "' failed");
  }

  /// The whole file in memory.
  std::vector<std::uint8_t> to_bytes() const {
    std::vector<std::uint8_t> bytes;
    emit([&](const void* p, std::size_t n) {
      const auto* b = static_cast<const std::uint8_t*>(p);
      bytes.insert(bytes.end(), b, b + n);
    });
    return bytes;
  }

 private:
  template <class Sink>
  void emit(Sink&& sink) const {
    const std::string h = header();
    std::uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = std::uint8_t((std::uint64_t(h.size()) >> (8 * i)) & 0xff);
    sink(len, 8);
    sink(h.data(), h.size());
    for (const auto& [name, e] : entries_) sink(e.data, static_cast<std::size_t>(e.bytes));
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
