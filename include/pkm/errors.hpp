// pkm/errors.hpp — pkm's one error rule, and the helpers its messages and the memory-parallel
// group's error transport go through (docs/architecture.md, "Errors").
//
//   std::invalid_argument  what the caller passed is wrong: an argument's shape, size, option
//                          or value — or the contents of a well-formed file that do not fit
//                          what the call expects (a tensor of another shape, a NaN in a
//                          checkpoint's table, impossible optimizer state)
//   std::out_of_range      an index outside its range: a row or slot id outside its table, a
//                          tensor name a file does not hold
//   std::runtime_error     what no argument check can foresee: bytes that are not the format
//                          (a malformed, truncated or changed file), a failed system or MPI
//                          call, a non-finite value computed from finite inputs (an overflow)
//                          or held by a parameter or table
//
// A message reads "who: field = value, expected what": who is the function
// ("pkm::MemoryLayer::forward"), field the argument, tensor or option, value what was given
// (clipped when it comes from a file), and what was expected. Nothing is changed when an
// error is thrown, unless the function says otherwise.
#pragma once

#include <exception>
#include <stdexcept>
#include <string>

namespace pkm {

/// The three kinds of the rule, as numbers that travel (the memory-parallel group sends the
/// kind of a process's error to the others, which throw the same kind).
enum class ErrorKind : int { invalid_argument = 1, out_of_range = 2, runtime_error = 3 };

/// The kind of a caught exception; any other std::exception (or anything else) counts as
/// runtime_error.
inline ErrorKind error_kind(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::out_of_range&) {
    return ErrorKind::out_of_range;
  } catch (const std::invalid_argument&) {
    return ErrorKind::invalid_argument;
  } catch (...) {
    return ErrorKind::runtime_error;
  }
}

/// Throws an exception of `kind` with `message`.
[[noreturn]] inline void throw_error(ErrorKind kind, const std::string& message) {
  if (kind == ErrorKind::invalid_argument) throw std::invalid_argument(message);
  if (kind == ErrorKind::out_of_range) throw std::out_of_range(message);
  throw std::runtime_error(message);
}

/// "who: field = value, expected what".
inline std::string expected_message(const std::string& who, const std::string& field,
                                    const std::string& value, const std::string& expected) {
  return who + ": " + field + " = " + value + ", expected " + expected;
}

/// std::invalid_argument with expected_message.
[[noreturn]] inline void throw_expected(const std::string& who, const std::string& field,
                                        const std::string& value, const std::string& expected) {
  throw std::invalid_argument(expected_message(who, field, value, expected));
}

}  // namespace pkm
