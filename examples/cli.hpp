// examples/cli.hpp — what pkm's command-line programs share when they read their flags.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <string>

namespace pkmcli {

/// The most OpenMP threads a program accepts for --threads: 4 x the processors this process
/// may run on. More never helps pkm's loops, and far more (100,000) crashes the OpenMP
/// runtime while it starts its threads.
inline int max_threads() { return 4 * std::max(1, omp_get_num_procs()); }

/// Empty if `threads` is an allowed --threads value, else what to tell the user.
inline std::string threads_error(long long threads) {
  if (threads >= 1 && threads <= max_threads()) return "";
  return "--threads " + std::to_string(threads) +
         ": expected 1 <= threads <= " + std::to_string(max_threads()) + " (4 x the " +
         std::to_string(std::max(1, omp_get_num_procs())) + " processors this process may use)";
}

/// The whole number `text` gives for `flag`, or fail(message) (which must not return) when it
/// is not one, overflows, or lies outside [lo, hi].
template <class Fail>
long long whole_number(const std::string& flag, const std::string& text, long long lo,
                       long long hi, Fail&& fail) {
  char* end = nullptr;
  errno = 0;
  const long long n = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno == ERANGE || n < lo || n > hi) {
    fail(flag + " " + text + ": expected a whole number " +
         (hi == LLONG_MAX ? ">= " + std::to_string(lo)
                          : "in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]"));
  }
  return n;
}

}  // namespace pkmcli
