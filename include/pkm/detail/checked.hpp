// pkm/detail/checked.hpp — size arithmetic that cannot wrap. Every size pkm computes from
// outside input (a file's shapes, a caller's rows and columns, a config's n_keys) goes
// through these: a product is formed only after checking it stays within a limit, and a
// failed check throws with the caller's name, the operands and the limit.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

namespace pkm::detail {

/// The largest size in bytes pkm accepts for one tensor or table (2^62): far beyond any
/// memory, and with room for one more multiply by an element size without wrapping.
inline constexpr std::uint64_t kMaxBytes = std::uint64_t{1} << 62;

/// a * b if it is at most `limit`; std::nullopt otherwise. Never wraps.
constexpr std::optional<std::uint64_t> product_within(std::uint64_t a, std::uint64_t b,
                                                      std::uint64_t limit = kMaxBytes) {
  if (a > limit || b > limit) return std::nullopt;
  if (a != 0 && b > limit / a) return std::nullopt;
  return a * b;
}

/// a * b for sizes a, b >= 0, or std::invalid_argument "who: what = a x b is out of range;
/// expected at most <limit>" (also for a negative operand).
inline std::int64_t checked_mul(const char* who, const char* what, std::int64_t a, std::int64_t b,
                                std::uint64_t limit = kMaxBytes) {
  const auto p = (a >= 0 && b >= 0) ? product_within(static_cast<std::uint64_t>(a),
                                                     static_cast<std::uint64_t>(b), limit)
                                    : std::nullopt;
  if (!p) {
    throw std::invalid_argument(
        std::string(who) + ": " + what + " = " + std::to_string(a) + " x " + std::to_string(b) +
        " is out of range; expected sizes >= 0 with a product of at most " + std::to_string(limit));
  }
  return static_cast<std::int64_t>(*p);
}

/// a + b for sizes a, b >= 0 within `limit`, or std::invalid_argument as checked_mul.
inline std::int64_t checked_add(const char* who, const char* what, std::int64_t a, std::int64_t b,
                                std::uint64_t limit = kMaxBytes) {
  if (a < 0 || b < 0 || static_cast<std::uint64_t>(a) > limit ||
      static_cast<std::uint64_t>(b) > limit - static_cast<std::uint64_t>(a)) {
    throw std::invalid_argument(
        std::string(who) + ": " + what + " = " + std::to_string(a) + " + " + std::to_string(b) +
        " is out of range; expected sizes >= 0 with a sum of at most " + std::to_string(limit));
  }
  return a + b;
}

}  // namespace pkm::detail
