// pkm/io/paths.hpp — the guard every writer of files from other files uses (pkm_run, the
// shard tools, the converters): the files written must not be the files read, nor one
// another. pkm writes atomically (a temporary file renamed over the target), so writing an
// input's path would replace the input — a checkpoint's table gone, with a successful exit.
#pragma once

#include <sys/stat.h>

#include <filesystem>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace pkm::io {

/// A path a tool reads or writes, with the name the user knows it by (a flag, "shard 2").
struct NamedPath {
  std::string name, path;
};

namespace detail {
/// True when a and b name the same file: the same device and inode where both exist (links,
/// hard links, other spellings), else the same absolute path with the links of its existing
/// part resolved.
inline bool same_file(const std::string& a, const std::string& b) {
  struct stat sa {
  }, sb{};
  if (::stat(a.c_str(), &sa) == 0 && ::stat(b.c_str(), &sb) == 0) {
    return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
  }
  std::error_code ea, eb;
  const auto ca = std::filesystem::weakly_canonical(std::filesystem::absolute(a), ea);
  const auto cb = std::filesystem::weakly_canonical(std::filesystem::absolute(b), eb);
  return !ea && !eb && ca == cb;
}
}  // namespace detail

/// Throws std::invalid_argument unless every output is a file of its own: not an input (nor a
/// link to one) and not another output. Call it before writing anything.
inline void check_outputs(const char* who, const std::vector<NamedPath>& outputs,
                          const std::vector<NamedPath>& inputs) {
  for (std::size_t o = 0; o < outputs.size(); ++o) {
    if (outputs[o].path.empty())
      throw std::invalid_argument(std::string(who) + ": " + outputs[o].name + " is empty");
    for (const NamedPath& in : inputs) {
      if (detail::same_file(outputs[o].path, in.path)) {
        throw std::invalid_argument(std::string(who) + ": " + outputs[o].name + " '" +
                                    outputs[o].path + "' is the same file as " + in.name + " '" +
                                    in.path +
                                    "'; expected a new path (writing it would replace the input)");
      }
    }
    for (std::size_t p = 0; p < o; ++p) {
      if (detail::same_file(outputs[o].path, outputs[p].path)) {
        throw std::invalid_argument(std::string(who) + ": " + outputs[o].name + " '" +
                                    outputs[o].path + "' is the same file as " + outputs[p].name +
                                    " '" + outputs[p].path +
                                    "'; expected a file of its own for each output");
      }
    }
  }
}

}  // namespace pkm::io
