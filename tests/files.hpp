// Test support for file handling: safetensors files built byte by byte, and the error a
// reader gives for them.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <pkm/io/safetensors.hpp>

namespace pkmtest {

/// A safetensors file from a header text and a zeroed data section of `data_bytes`.
inline std::vector<std::uint8_t> raw_file(const std::string& header, std::size_t data_bytes) {
  std::vector<std::uint8_t> b(8 + header.size() + data_bytes, 0);
  const std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) b[i] = std::uint8_t(n >> (8 * i));
  std::copy(header.begin(), header.end(), b.begin() + 8);
  return b;
}

/// The std::runtime_error reading `bytes` gives, or "no error".
inline std::string read_error(std::vector<std::uint8_t> bytes,
                              const std::string& label = "bad.safetensors") {
  try {
    pkm::io::SafetensorsFile::from_bytes(std::move(bytes), label);
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace pkmtest
