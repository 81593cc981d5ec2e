// pkm/distributed/detail/wire.hpp — what pkm::distributed::Group builds its messages from:
// MPI element types, checked counts, the fingerprints processes compare, the point-to-point
// exchange that moves transfers of any size in messages MPI's int counts allow, and the phases
// and agreed items a collective call names (Op, Agreed: public, in pkm::distributed).
// Needs MPI (the CMake target pkm::mpi).
#pragma once

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "pkm/detail/checked.hpp"
#include "pkm/types.hpp"

namespace pkm::distributed {

namespace detail {
template <class T>
MPI_Datatype mpi_type() {
  if constexpr (std::is_same_v<T, float>) {
    return MPI_FLOAT;
  } else if constexpr (std::is_same_v<T, double>) {
    return MPI_DOUBLE;
  } else if constexpr (std::is_same_v<T, std::int64_t>) {
    return MPI_INT64_T;
  } else if constexpr (std::is_same_v<T, std::uint64_t>) {
    return MPI_UINT64_T;
  } else if constexpr (std::is_same_v<T, char>) {
    return MPI_CHAR;
  } else {
    static_assert(sizeof(T) == 0, "pkm::distributed: no MPI type for this element type");
  }
}

/// n as an MPI count (an int), or std::runtime_error naming what is too large.
inline int mpi_count(const char* who, const char* what, Index n) {
  if (n < 0 || n > INT_MAX) {
    throw std::runtime_error(std::string(who) + ": " + what + " needs " + std::to_string(n) +
                             " elements in one MPI call, more than MPI's int counts allow (" +
                             std::to_string(INT_MAX) + "); split the batch");
  }
  return static_cast<int>(n);
}

/// a + b for element counts, or std::invalid_argument naming what is too large.
inline Index checked_sum(const char* who, const char* what, Index a, Index b) {
  return pkm::detail::checked_add(who, what, a, b);
}

/// floor(n q / parts) without forming n q: where an even split of n items over `parts`
/// ends part q - 1.
inline Index split_point(Index n, int q, int parts) {
  return n / parts * q + n % parts * q / parts;
}

/// FNV-1a over bytes: what the group compares to find processes that disagree.
class Fingerprint {
 public:
  Fingerprint& add_bytes(const void* p, std::size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < n; ++i) h_ = (h_ ^ b[i]) * 0x100000001b3ull;
    return *this;
  }
  template <class T>
  Fingerprint& add(const T& v) {
    static_assert(std::is_trivially_copyable_v<T>, "fingerprint of a trivially copyable value");
    return add_bytes(&v, sizeof v);
  }
  Fingerprint& add(const std::string& s) {
    add(s.size());
    return add_bytes(s.data(), s.size());
  }
  template <class T>
  Fingerprint& add(const std::optional<T>& v) {
    add(v.has_value());
    return v ? add(*v) : *this;
  }
  /// Every element of a tuple (a config's or options' fields()).
  template <class... T>
  Fingerprint& add_fields(const std::tuple<T...>& fields) {
    std::apply([&](const auto&... f) { (add(f), ...); }, fields);
    return *this;
  }
  std::uint64_t value() const { return h_; }

 private:
  std::uint64_t h_ = 0xcbf29ce484222325ull;
};

/// Throws std::runtime_error for an MPI error code (pkm's communicators return errors instead
/// of aborting).
inline void mpi_check(const char* who, const char* call, int code) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, text, &len);
  throw std::runtime_error(std::string(who) + ": " + call +
                           " failed: " + std::string(text, static_cast<std::size_t>(len)));
}

/// Point-to-point transfers of one collective, each split into messages of at most `limit`
/// elements, completed together by wait(). Messages between two processes arrive in the order
/// they were posted (MPI's non-overtaking rule), so chunks need no tags of their own.
class Exchange {
 public:
  Exchange(MPI_Comm comm, Index limit, std::uint64_t& messages, const char* who)
      : comm_(comm), limit_(limit), messages_(messages), who_(who) {}
  Exchange(const Exchange&) = delete;
  Exchange& operator=(const Exchange&) = delete;
  ~Exchange() {
    if (!requests_.empty())
      MPI_Waitall(static_cast<int>(requests_.size()), requests_.data(), MPI_STATUSES_IGNORE);
  }
  template <class T>
  void send(int to, const T* data, Index n) {
    post(n, [&](Index at, int count, MPI_Request* r) {
      return MPI_Isend(data + at, count, mpi_type<T>(), to, kTag, comm_, r);
    });
  }
  template <class T>
  void receive(int from, T* data, Index n) {
    post(n, [&](Index at, int count, MPI_Request* r) {
      return MPI_Irecv(data + at, count, mpi_type<T>(), from, kTag, comm_, r);
    });
  }
  void wait() {
    std::vector<MPI_Request> r;
    r.swap(requests_);
    if (!r.empty())
      mpi_check(who_, "MPI_Waitall",
                MPI_Waitall(static_cast<int>(r.size()), r.data(), MPI_STATUSES_IGNORE));
  }

 private:
  static constexpr int kTag = 0x706b6d;  // "pkm"
  template <class Post>
  void post(Index n, Post&& p) {
    for (Index at = 0; at < n; at += limit_) {
      const int count = static_cast<int>(std::min(limit_, n - at));
      requests_.emplace_back();
      ++messages_;
      mpi_check(who_, "MPI_Isend / MPI_Irecv", p(at, count, &requests_.back()));
    }
  }
  MPI_Comm comm_;
  Index limit_;
  std::uint64_t& messages_;
  const char* who_;
  std::vector<MPI_Request> requests_;
};
}  // namespace detail

/// The phases of a collective pkm call. A call is identified by its name (the `who` every
/// pkm function passes: "pkm::distributed::MemoryParallelLayer::sum_gradients") together with
/// the phase, so two processes in different calls are told so even where both calls open with
/// the same phase (sum_gradients and sum_slot_statistics both open with `sum`).
enum class Op : std::uint64_t {
  construct = 1,
  read = 2,
  read_check = 3,
  read_backward = 4,
  read_backward_update = 5,
  layer_forward = 6,
  layer_forward_end = 7,
  layer_backward = 8,
  step = 9,
  sum = 10,
  checkpoint = 11,
  checkpoint_write = 12,
  same = 13,
  result = 14,
  verify = 15,
};

inline const char* op_name(Op op) {
  switch (op) {
    case Op::construct:
      return "construct";
    case Op::read:
      return "read";
    case Op::read_check:
      return "read_check";
    case Op::read_backward:
      return "read_backward";
    case Op::read_backward_update:
      return "read_backward_update";
    case Op::layer_forward:
      return "layer_forward";
    case Op::layer_forward_end:
      return "layer_forward_end";
    case Op::layer_backward:
      return "layer_backward";
    case Op::step:
      return "step";
    case Op::sum:
      return "sum";
    case Op::checkpoint:
      return "checkpoint";
    case Op::checkpoint_write:
      return "checkpoint_write";
    case Op::same:
      return "same";
    case Op::result:
      return "result";
    case Op::verify:
      return "verify";
  }
  return "?";
}

/// One thing the processes of a group must agree on (Group::require_same): what it is, for
/// the message, and a fingerprint of this process's value.
struct Agreed {
  std::string what;
  std::uint64_t fingerprint = 0;
};

}  // namespace pkm::distributed
