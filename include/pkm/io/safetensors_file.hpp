// pkm/io/safetensors_file.hpp — reading a safetensors file (pkm/io/format.hpp).
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
// a crash; a layer from load_layer_mapped calls check_unchanged() before each read, so a file
// truncated or rewritten between forwards gives std::runtime_error too. pkm's own writer never
// truncates in place: it writes a temporary file and renames it over the target, so a mapped
// old version stays intact.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
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

#include "pkm/io/format.hpp"

namespace pkm::io {
namespace detail {
/// Owns the bytes of a file: a private mapping plus the open descriptor (copies are read
/// with pread), or a vector.
struct Bytes {
  std::uint8_t* data = nullptr;
  std::size_t size = 0;
  std::vector<std::uint8_t> owned;
  bool mapped = false;
  int fd = -1;
  struct stat opened {};  ///< the file's identity when opened (check_unchanged)
  Bytes() = default;
  Bytes(const Bytes&) = delete;
  Bytes& operator=(const Bytes&) = delete;
  ~Bytes() {
    if (mapped && data) munmap(data, size);
    if (fd >= 0) ::close(fd);
  }
};
}  // namespace detail

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
    bytes->opened = st;
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

  /// Throws std::runtime_error if the file is no longer as it was opened: shortened, or written
  /// since (its size or modification time changed). Reading a mapped page past a shortened
  /// file's end raises SIGBUS, so a mapped layer's forward calls this before each read
  /// (pkm/io/mapped_table.hpp). A file replaced by renaming another over it passes: the
  /// mapping still holds the old file, intact. Nothing to check for a file held in memory.
  void check_unchanged() const {
    if (bytes_->fd < 0) return;
    struct stat st {};
    if (::fstat(bytes_->fd, &st) != 0) fail(std::string("cannot stat: ") + std::strerror(errno));
    const struct stat& was = bytes_->opened;
    if (static_cast<std::size_t>(st.st_size) != bytes_->size) {
      fail("the file is now " + std::to_string(st.st_size) + " bytes, it had " +
           std::to_string(bytes_->size) + " when opened: it was truncated or rewritten while "
           "mapped (replace a mapped file by renaming a new one over it)");
    }
    if (st.st_mtim.tv_sec != was.st_mtim.tv_sec || st.st_mtim.tv_nsec != was.st_mtim.tv_nsec) {
      fail("the file was written since it was opened (its modification time changed): it "
           "was rewritten while mapped (replace a mapped file by renaming a new one over it)");
    }
  }

  /// Asks the kernel to start reading bytes [offset, offset + length) of tensor `t`'s data
  /// into the page cache, without waiting (posix_fadvise WILLNEED). Nothing for a file held
  /// in memory; the range is clipped to the tensor.
  void will_need(const TensorInfo& t, std::uint64_t offset, std::uint64_t length) const {
    if (bytes_->fd < 0 || offset >= t.end - t.begin) return;
    length = std::min(length, t.end - t.begin - offset);
    const std::uint64_t at = 8 + header_size_ + t.begin + offset;
    ::posix_fadvise(bytes_->fd, static_cast<off_t>(at), static_cast<off_t>(length),
                    POSIX_FADV_WILLNEED);  // advice: a failure only loses the early start
  }

  /// Whether bytes [offset, offset + length) of tensor `t`'s data are in memory now (mincore
  /// over their pages): reading them through the mapping will not wait for the disk. Always
  /// true for a file held in memory; the range is clipped to the tensor.
  bool resident(const TensorInfo& t, std::uint64_t offset, std::uint64_t length) const {
    if (!bytes_->mapped || offset >= t.end - t.begin) return true;
    const MappedPages r = pages(t, offset, std::min(length, t.end - t.begin - offset));
    unsigned char in[4];  // a row of up to 3 pages at once; longer ones 4 pages at a time
    for (std::uintptr_t p = r.first; p < r.end; p += 4 * r.page) {
      const std::size_t n = std::min<std::size_t>(4, (r.end - p + r.page - 1) / r.page);
      if (::mincore(reinterpret_cast<void*>(p), n * r.page, in) != 0) return false;
      for (std::size_t i = 0; i < n; ++i)
        if (!(in[i] & 1)) return false;
    }
    return true;
  }

  /// Tells the kernel the mapping of tensor `t` is read at random (madvise MADV_RANDOM): a page
  /// fault then reads that page alone instead of a read-ahead window around it.
  void advise_random(const TensorInfo& t) const {
    if (!bytes_->mapped || t.end == t.begin) return;
    const MappedPages r = pages(t, 0, t.end - t.begin);
    ::madvise(reinterpret_cast<void*>(r.first), r.end - r.first, MADV_RANDOM);  // advice only
  }

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
    visit<T>(name, [&](const T* v, std::size_t first, std::size_t n) {
      std::copy(v, v + n, out + first);
    });
  }

  /// Copies the tensor's bytes as they are in the file (end - begin bytes) into `out`, with
  /// pread.
  void read_raw(const TensorInfo& t, void* out) const {
    copy_out(t.begin, out, static_cast<std::size_t>(t.end - t.begin), t.name);
  }

  /// Converts elements [first, first + count) of the tensor into `out` (as read() does, with
  /// pread): for going through a large tensor a block of rows at a time. Throws
  /// std::out_of_range for a range outside the tensor.
  template <class T>
  void read_range(const std::string& name, std::uint64_t first, std::size_t count, T* out) const {
    const TensorInfo& t = info(name);
    const auto numel = static_cast<std::uint64_t>(t.numel());
    checked_info<T>(name, static_cast<std::size_t>(numel));
    if (first > numel || count > numel - first) {
      throw std::out_of_range(label_ + ": tensor '" + detail::clip(name) + "': elements [" +
                              std::to_string(first) + ", +" + std::to_string(count) +
                              ") are outside its " + std::to_string(numel));
    }
    if (count == 0) return;
    const std::size_t esize = dtype_size(t.dtype);
    if (t.dtype == dtype_of<T>()) {
      copy_out(t.begin + first * esize, out, count * esize, name);
      return;
    }
    std::vector<std::uint8_t> buf(count * esize);
    copy_out(t.begin + first * esize, buf.data(), buf.size(), name);
    for (std::size_t i = 0; i < count; ++i) out[i] = detail::load_element<T>(buf.data(), t.dtype, i);
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
      for (std::size_t i = 0; i < len; ++i)
        values[i] = detail::load_element<T>(buf.data(), t.dtype, i);
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
                                  std::to_string(t.numel()) + " elements, expected " +
                                  std::to_string(count));
    }
    constexpr bool want_float = is_float(dtype_of<T>());
    if (want_float != is_float(t.dtype)) {
      throw std::invalid_argument(
          label_ + ": tensor '" + detail::clip(name) + "' has dtype " + dtype_name(t.dtype) +
          ", expected " +
          (want_float ? "a float dtype (F32, F64, BF16, F16)" : "an integer dtype (I64, I32, U8)"));
    }
    return t;
  }
  const TensorInfo* find(const std::string& name) const {
    auto it =
        std::lower_bound(tensors_.begin(), tensors_.end(), name,
                         [](const TensorInfo& t, const std::string& n) { return t.name < n; });
    return (it != tensors_.end() && it->name == name) ? &*it : nullptr;
  }
  std::uint8_t* data_begin() const { return bytes_->data + 8 + header_size_; }

  /// The mapping's bytes [offset, offset + length) of tensor t, from the start of their first
  /// page (what madvise and mincore take).
  struct MappedPages {
    std::uintptr_t first, end, page;
  };
  MappedPages pages(const TensorInfo& t, std::uint64_t offset, std::uint64_t length) const {
    const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
    const auto at = reinterpret_cast<std::uintptr_t>(data_begin() + t.begin + offset);
    return {at / page * page, at + length, page};
  }

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
      const ssize_t r =
          ::pread(bytes_->fd, out + done, n - done, static_cast<off_t>(offset + done));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) {
        fail(what + ": the file ended (or failed to read: " +
             std::string(r < 0 ? std::strerror(errno) : "end of file") + ") at byte " +
             std::to_string(offset + done) + " of the " + std::to_string(bytes_->size) +
             " it had when opened; it was changed while in use");
      }
      done += static_cast<std::size_t>(r);
    }
  }
  void copy_out(std::uint64_t data_offset, void* dst, std::size_t n,
                const std::string& name) const {
    read_at(8 + header_size_ + data_offset, dst, n, "tensor '" + detail::clip(name) + "'");
  }

  void parse() {
    const std::size_t size = bytes_->size;
    if (size < 8)
      fail("truncated: " + std::to_string(size) + " bytes, the header length alone needs 8");
    std::uint8_t len[8];
    read_at(0, len, 8, "header length");
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | len[i];
    if (n > kMaxHeaderBytes)
      fail("header length " + std::to_string(n) + " is over the limit of " +
           std::to_string(kMaxHeaderBytes) + " bytes");
    if (n > size - 8)
      fail("header length " + std::to_string(n) + " runs past the end of the file (" +
           std::to_string(size) + " bytes)");
    header_size_ = n;
    const std::uint64_t data_size = size - 8 - n;
    std::vector<std::uint8_t> text(static_cast<std::size_t>(n));
    read_at(8, text.data(), text.size(), "header");
    // Bound the nesting before nlohmann sees the text: its dump() and (older releases) its
    // destructor recurse once per level.
    const int depth = detail::json_depth(text.data(), text.size(), kMaxHeaderDepth);
    if (depth > kMaxHeaderDepth) {
      fail("header nests JSON more than " + std::to_string(kMaxHeaderDepth) +
           " levels deep; a safetensors header needs 3");
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
          if (!m.value().is_string())
            fail("__metadata__ value of '" + detail::clip(m.key()) + "' is not a string");
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
      if (!parsed)
        fail_tensor(name, "unknown dtype '" + detail::clip(dt->get<std::string>()) +
                              "'; expected F32, F64, BF16, F16, I64, I32 or U8");
      t.dtype = *parsed;
      const auto sh = v.find("shape");
      if (sh == v.end() || !sh->is_array()) fail_tensor(name, "missing shape");
      if (sh->size() > 64)
        fail_tensor(name,
                    "shape has " + std::to_string(sh->size()) + " dimensions; expected at most 64");
      // numel x element size within 2^62 bytes, every product checked before it is formed.
      std::optional<std::uint64_t> bytes_needed = dtype_size(t.dtype);
      for (const auto& d : *sh) {
        if (!d.is_number_unsigned())
          fail_tensor(name,
                      "shape entry " + detail::describe(d) + " is not a non-negative integer");
        const std::uint64_t dim = d.get<std::uint64_t>();
        if (dim > pkm::detail::kMaxBytes)
          fail_tensor(name, "shape entry " + std::to_string(dim) + " is over the limit of 2^62");
        if (bytes_needed) bytes_needed = pkm::detail::product_within(*bytes_needed, dim);
        t.shape.push_back(static_cast<std::int64_t>(dim));
      }
      if (!bytes_needed) {
        fail_tensor(name, "shape " + detail::clip(t.shape_string()) + " of " + dtype_name(t.dtype) +
                              " needs more than 2^62 bytes");
      }
      const auto off = v.find("data_offsets");
      if (off == v.end() || !off->is_array() || off->size() != 2 ||
          !(*off)[0].is_number_unsigned() || !(*off)[1].is_number_unsigned()) {
        fail_tensor(name, "data_offsets must be [begin, end] of non-negative integers");
      }
      t.begin = (*off)[0].get<std::uint64_t>();
      t.end = (*off)[1].get<std::uint64_t>();
      if (t.begin > t.end || t.end > data_size) {
        fail_tensor(name, "data_offsets [" + std::to_string(t.begin) + ", " +
                              std::to_string(t.end) + "] are outside the data section of " +
                              std::to_string(data_size) + " bytes");
      }
      const std::uint64_t want = *bytes_needed;
      if (t.end - t.begin != want) {
        fail_tensor(name, "shape " + detail::clip(t.shape_string()) + " of " + dtype_name(t.dtype) +
                              " needs " + std::to_string(want) + " bytes, but data_offsets span " +
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
        fail_tensor(b->name, "data_offsets [" + std::to_string(b->begin) + ", " +
                                 std::to_string(b->end) + "] overlap those of '" +
                                 detail::clip(a->name) + "'");
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

}  // namespace pkm::io
