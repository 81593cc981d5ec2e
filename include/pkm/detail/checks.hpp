// pkm/detail/checks.hpp — argument checks shared by the ops: shapes and slot ids. Each throws
// with the caller's name, the argument's name, what it got and what was expected.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "pkm/detail/vec_math.hpp"
#include "pkm/types.hpp"

namespace pkm::detail {

/// Throws std::invalid_argument unless `name` is want_rows x want_cols.
inline void check_same_shape(const char* who, const char* name, Index rows, Index cols,
                             Index want_rows, Index want_cols) {
  if (rows != want_rows || cols != want_cols) {
    throw std::invalid_argument(std::string(who) + ": " + name + " is " + std::to_string(rows) +
                                " x " + std::to_string(cols) + ", expected " +
                                std::to_string(want_rows) + " x " + std::to_string(want_cols));
  }
}

/// Throws std::invalid_argument naming the first element of `m` that is NaN or infinite:
/// "who: name(b, d) = nan is not finite; expected finite values<note>".
template <class Block>
void check_finite(const char* who, const char* name, const Block& m, const char* note = "") {
  for (Index b = 0; b < m.rows(); ++b) {
    if (all_finite(m.row(b).data(), m.cols())) continue;
    for (Index d = 0; d < m.cols(); ++d) {
      const auto v = m(b, d);
      if (!all_finite(&v, 1)) {
        throw std::invalid_argument(std::string(who) + ": " + name + "(" + std::to_string(b) +
                                    ", " + std::to_string(d) + ") = " + std::to_string(m(b, d)) +
                                    " is not finite; expected finite values" + note);
      }
    }
  }
}

/// Throws std::out_of_range unless every index is a row of a table of `rows` rows.
inline void check_indices(const char* who, const ConstIndexRef& idx, Index rows) {
  for (Index b = 0; b < idx.rows(); ++b) {
    for (Index l = 0; l < idx.cols(); ++l) {
      const std::int64_t r = idx(b, l);
      if (r < 0 || r >= rows) {
        throw std::out_of_range(std::string(who) + ": indices(" + std::to_string(b) + ", " +
                                std::to_string(l) + ") = " + std::to_string(r) +
                                " is outside the table; expected 0 <= index < " +
                                std::to_string(rows));
      }
    }
  }
}

}  // namespace pkm::detail
