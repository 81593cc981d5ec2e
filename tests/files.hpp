// Test support for file handling: safetensors files built byte by byte, and the error a
// reader gives for them.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <pkm/io/optimizer_state.hpp>
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

/// An optimizer's state file as a reader sees it, each tensor passed through `edit(name,
/// data, count)` first (to corrupt one field).
template <class Optimizer, class Edit>
inline pkm::io::SafetensorsFile state_file(Optimizer& opt, Edit&& edit) {
  std::vector<std::vector<double>> floats;
  std::vector<std::vector<std::int64_t>> ints;
  floats.reserve(16);
  ints.reserve(16);
  pkm::io::SafetensorsWriter w;
  opt.for_each_state(
      [&](const std::string& name, std::vector<std::int64_t> shape, auto* data, auto...) {
        using T = std::remove_pointer_t<decltype(data)>;
        std::size_t n = 1;
        for (auto d : shape) n *= static_cast<std::size_t>(d);
        if constexpr (std::is_floating_point_v<T>) {
          floats.emplace_back(data, data + n);
          edit(name, floats.back().data(), n);
          w.add(name, shape, floats.back().data());
        } else {
          ints.emplace_back(data, data + n);
          edit(name, ints.back().data(), n);
          w.add(name, shape, ints.back().data());
        }
      });
  return pkm::io::SafetensorsFile::from_bytes(w.to_bytes(), "state.safetensors");
}

/// An optimizer's state file as bytes.
template <class Optimizer>
inline std::vector<std::uint8_t> state_bytes(Optimizer& opt) {
  pkm::io::SafetensorsWriter w;
  pkm::io::add_optimizer_state(w, opt, "");
  return w.to_bytes();
}

}  // namespace pkmtest
