// pkm/io/safetensors_writer.hpp — writing a safetensors file (pkm/io/format.hpp),
// atomically: a temporary file in the same folder, flushed, renamed over the target.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pkm/io/format.hpp"

namespace pkm::io {

/// Collects tensors (by pointer: the data must stay valid until write) and writes a file.
/// Tensors are laid out in name order, the header padded with spaces to 8 bytes. What it
/// writes, SafetensorsFile reads: add() refuses shapes over 2^62 bytes, names and metadata
/// that are not UTF-8, and anything else the reader would reject.
class SafetensorsWriter {
 public:
  void add(const std::string& name, Dtype dtype, std::vector<std::int64_t> shape,
           const void* data) {
    const std::uint64_t bytes = checked_entry("pkm::io::SafetensorsWriter::add", name, dtype, shape);
    if (bytes > 0 && data == nullptr) {
      throw std::invalid_argument("pkm::io::SafetensorsWriter::add: tensor '" +
                                  detail::clip(name) + "' has null data");
    }
    entries_[name] = Entry{dtype, std::move(shape), data, bytes, 0, {}};
  }
  /// Adds a tensor whose bytes are made while the file is written: fill(offset, out, n) writes
  /// the n bytes at `offset` of the tensor into out, for consecutive chunks of at most
  /// `chunk_bytes` (a multiple of a row's bytes, so that each chunk is whole rows). For
  /// converting a table a block of rows at a time without holding it; an exception from fill
  /// abandons the write (the file at the path stays as it was).
  void add_generated(const std::string& name, Dtype dtype, std::vector<std::int64_t> shape,
                     std::uint64_t chunk_bytes,
                     std::function<void(std::uint64_t, std::uint8_t*, std::size_t)> fill) {
    const char* who = "pkm::io::SafetensorsWriter::add_generated";
    const std::uint64_t bytes = checked_entry(who, name, dtype, shape);
    if (chunk_bytes == 0 || chunk_bytes > (std::uint64_t{1} << 32) || !fill) {
      throw std::invalid_argument(std::string(who) + ": tensor '" + detail::clip(name) +
                                  "' needs a fill function and chunks of 1 byte to 4 GiB");
    }
    entries_[name] = Entry{dtype, std::move(shape), nullptr, bytes, chunk_bytes, std::move(fill)};
  }
  template <class T>
  void add(const std::string& name, std::vector<std::int64_t> shape, const T* data) {
    add(name, dtype_of<T>(), std::move(shape), data);
  }

 private:
  /// Checks a new entry's name and shape; returns its bytes.
  std::uint64_t checked_entry(const char* who, const std::string& name, Dtype dtype,
                              const std::vector<std::int64_t>& shape) const {
    if (name.empty() || name == "__metadata__") {
      throw std::invalid_argument(std::string(who) + ": invalid tensor name '" + name + "'");
    }
    check_utf8(who, "tensor name", name);
    if (entries_.count(name)) {
      throw std::invalid_argument(std::string(who) + ": tensor '" + detail::clip(name) +
                                  "' added twice");
    }
    if (shape.size() > 64) {
      throw std::invalid_argument(std::string(who) + ": tensor '" + detail::clip(name) + "' has " +
                                  std::to_string(shape.size()) +
                                  " dimensions; expected at most 64");
    }
    std::optional<std::uint64_t> bytes = dtype_size(dtype);
    for (auto d : shape) {
      if (d < 0) {
        throw std::invalid_argument(std::string(who) + ": tensor '" + detail::clip(name) +
                                    "' has shape " + detail::clip(shape_string(shape)) +
                                    "; expected dimensions >= 0");
      }
      if (bytes) bytes = pkm::detail::product_within(*bytes, static_cast<std::uint64_t>(d));
    }
    if (!bytes) {
      throw std::invalid_argument(std::string(who) + ": tensor '" + detail::clip(name) +
                                  "' of shape " + detail::clip(shape_string(shape)) +
                                  " needs more than 2^62 bytes");
    }
    if (dtype_size(dtype) == 0) {
      throw std::invalid_argument(std::string(who) + ": tensor '" + detail::clip(name) +
                                  "' has dtype " + dtype_name(dtype) +
                                  ", which is not an element dtype (a file holds quantized rows "
                                  "as U8)");
    }
    return *bytes;
  }

 public:
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
        throw std::invalid_argument(
            "pkm::io::SafetensorsWriter: the tensors add up to more than 2^62 bytes");
      }
      h[name] = {{"dtype", dtype_name(e.dtype)},
                 {"shape", e.shape},
                 {"data_offsets", {offset, offset + e.bytes}}};
      offset += e.bytes;
    }
    std::string s = h.dump();  // every string was checked to be UTF-8 when added
    s.append((8 - s.size() % 8) % 8, ' ');
    if (s.size() > kMaxHeaderBytes) {
      throw std::invalid_argument("pkm::io::SafetensorsWriter: the header would be " +
                                  std::to_string(s.size()) + " bytes, over the readers' limit of " +
                                  std::to_string(kMaxHeaderBytes));
    }
    return s;
  }

  /// Writes the file to `path` atomically: into a new temporary file in the same folder, flushed
  /// and fsync'd, then renamed over `path` (and the folder fsync'd). Until the rename an existing
  /// file at `path` is untouched, and on any failure it stays as it was and the temporary file is
  /// removed. A file that is replaced keeps its permissions; a symbolic link at `path` is replaced
  /// by the new file (its target is left alone). The tensors are streamed, not copied first. Throws
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
      throw std::runtime_error(std::string(who) + ": cannot create a temporary file next to '" +
                               path + "': " + std::strerror(errno));
    }
    auto fail = [&](const std::string& what) {
      const int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      throw std::runtime_error(std::string(who) + ": " + what + " '" + path + "' failed: " +
                               std::strerror(err) + " (the previous file, if any, is unchanged)");
    };
    // A file being replaced keeps its permissions.
    struct stat target {};
    if (::stat(path.c_str(), &target) == 0 && S_ISREG(target.st_mode) &&
        ::fchmod(fd, target.st_mode & 07777) != 0) {
      fail("setting the permissions of the file replacing");
    }
    bool ok = true;
    try {
    emit(h, [&](const void* p, std::size_t n) {
      const auto* b = static_cast<const std::uint8_t*>(p);
      while (ok && n > 0) {
        const ssize_t r = ::write(fd, b, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
          ok = false;
          break;
        }
        b += r;
        n -= static_cast<std::size_t>(r);
      }
    });
    } catch (...) {  // a generated tensor's fill failed: no new file
      ::close(fd);
      ::unlink(tmp.c_str());
      throw;
    }
    if (!ok) fail("writing");
    if (::fsync(fd) != 0) fail("flushing");
    if (::close(fd) != 0) {
      const int err = errno;
      ::unlink(tmp.c_str());
      throw std::runtime_error(std::string(who) + ": closing '" + path +
                               "' failed: " + std::strerror(err));
    }
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
      const int err = errno;
      ::unlink(tmp.c_str());
      throw std::runtime_error(std::string(who) + ": renaming the new file over '" + path +
                               "' failed: " + std::strerror(err) +
                               " (the previous file, if any, is unchanged)");
    }
    // Make the rename itself durable.
    const auto slash = path.find_last_of('/');
    const std::string dir =
        slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
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
      throw std::invalid_argument(
          std::string(who) + ": the " + what +
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
      if (e.bytes == 0) continue;
      if (!e.fill) {
        sink(e.data, static_cast<std::size_t>(e.bytes));
        continue;
      }
      std::vector<std::uint8_t> chunk(static_cast<std::size_t>(std::min(e.chunk, e.bytes)));
      for (std::uint64_t off = 0; off < e.bytes; off += e.chunk) {
        const auto n = static_cast<std::size_t>(std::min(e.chunk, e.bytes - off));
        e.fill(off, chunk.data(), n);
        sink(chunk.data(), n);
      }
    }
  }

  struct Entry {
    Dtype dtype;
    std::vector<std::int64_t> shape;
    const void* data;
    std::uint64_t bytes;
    std::uint64_t chunk;  ///< for a generated tensor: bytes per call of fill
    std::function<void(std::uint64_t, std::uint8_t*, std::size_t)> fill;
  };
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace pkm::io
