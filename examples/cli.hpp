// examples/cli.hpp — what pkm's command-line programs share when they read their flags.
#pragma once

#include <omp.h>

#include <algorithm>
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

}  // namespace pkmcli
