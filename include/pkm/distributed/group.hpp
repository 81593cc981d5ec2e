// pkm/distributed/group.hpp — a group of processes sharing one memory layer (memory
// parallelism), over MPI: the collectives pkm needs, each with a fixed summation order, and
// the agreement that turns an error on one process into the same exception on every process
// (never a hang, never one process going on alone).
//
// Needs MPI (the CMake target pkm::mpi); the rest of pkm never does.
#pragma once

#include <mpi.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

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
  std::uint64_t value() const { return h_; }

 private:
  std::uint64_t h_ = 0xcbf29ce484222325ull;
};
}  // namespace detail

/// The operation codes each collective pkm call agrees on first: processes that are not in
/// the same call (one in forward, another in backward) are told so instead of mixing up
/// their messages.
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
};

/// A group of processes: a duplicate of the caller's communicator (so pkm's messages never
/// mix with the caller's), made and freed collectively. MPI must be initialised first and
/// finalised after the group is destroyed. Not copyable; layers keep a pointer to it, so it
/// must outlive them. One thread at a time per group (MPI_THREAD_FUNNELED is enough).
class Group {
 public:
  /// Collective over `comm`.
  explicit Group(MPI_Comm comm) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) {
      throw std::runtime_error("pkm::distributed::Group: MPI is not initialised; call MPI_Init first");
    }
    if (comm == MPI_COMM_NULL) throw std::invalid_argument("pkm::distributed::Group: comm is MPI_COMM_NULL");
    check("pkm::distributed::Group", "MPI_Comm_dup", MPI_Comm_dup(comm, &comm_));
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~Group() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  }
  Group(const Group&) = delete;
  Group& operator=(const Group&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  MPI_Comm comm() const { return comm_; }

  /// Bytes of payload this process has sent to other processes through the group's data
  /// collectives (all-gathers, all-to-alls, reductions; not the small agreement messages),
  /// counted as a point-to-point implementation sends them: what docs/distributed.md's
  /// formulas give. For measuring traffic per token.
  std::uint64_t bytes_sent() const { return bytes_sent_; }

  /// Runs local() (which may throw), then agrees with every process of the group: all must
  /// be in the same operation `op` (else every process throws std::runtime_error), and if any
  /// process's local() threw, every process throws — the first failing process its own
  /// exception, the others one of the same type (std::invalid_argument, std::out_of_range or
  /// std::runtime_error) that names the failing process and carries its message.
  template <class F>
  void collectively(const char* who, Op op, F&& local) const {
    std::exception_ptr error;
    std::int64_t kind = 0;
    std::string message;
    try {
      local();
    } catch (const std::out_of_range& e) {
      error = std::current_exception(), kind = 2, message = e.what();
    } catch (const std::invalid_argument& e) {
      error = std::current_exception(), kind = 1, message = e.what();
    } catch (const std::exception& e) {
      error = std::current_exception(), kind = 3, message = e.what();
    } catch (...) {
      error = std::current_exception(), kind = 3, message = "an exception that is not a std::exception";
    }
    const auto code = static_cast<std::uint64_t>(op);
    std::uint64_t v[3] = {error ? static_cast<std::uint64_t>(rank_) : UINT64_MAX, code, ~code};
    check(who, "MPI_Allreduce", MPI_Allreduce(MPI_IN_PLACE, v, 3, MPI_UINT64_T, MPI_MIN, comm_));
    if (v[1] != ~v[2]) {  // min(op) != max(op)
      throw std::runtime_error(std::string(who) + ": the processes of the group are not in the same call (operation " +
                               std::to_string(code) + " here, " + std::to_string(v[1]) + " to " +
                               std::to_string(~v[2]) + " across the group); every process must make the same "
                               "pkm calls in the same order");
    }
    if (v[0] == UINT64_MAX) return;
    const int failed = static_cast<int>(v[0]);
    std::int64_t head[2] = {kind, static_cast<std::int64_t>(message.size())};
    check(who, "MPI_Bcast", MPI_Bcast(head, 2, MPI_INT64_T, failed, comm_));
    message.resize(static_cast<std::size_t>(head[1]));
    check(who, "MPI_Bcast", MPI_Bcast(message.data(), mpi_count_of(who, head[1]), MPI_CHAR, failed, comm_));
    if (rank_ == failed) std::rethrow_exception(error);
    const std::string text = std::string(who) + ": process " + std::to_string(failed) + " of the group failed (" +
                             "every process throws): " + message;
    if (head[0] == 1) throw std::invalid_argument(text);
    if (head[0] == 2) throw std::out_of_range(text);
    throw std::runtime_error(text);
  }

  /// Throws std::invalid_argument on every process unless `fingerprint` is the same on all
  /// (`what` says what it describes, for the message).
  void require_same(const char* who, const std::string& what, std::uint64_t fingerprint) const {
    std::uint64_t v[2] = {fingerprint, ~fingerprint};
    check(who, "MPI_Allreduce", MPI_Allreduce(MPI_IN_PLACE, v, 2, MPI_UINT64_T, MPI_MIN, comm_));
    if (v[0] != ~v[1]) {
      throw std::invalid_argument(std::string(who) + ": the processes of the group disagree on " + what +
                                  "; expected the same on every process");
    }
  }

  /// counts[q] = n on process q, on every process.
  std::vector<Index> allgather_count(const char* who, Index n) const {
    std::vector<Index> counts(static_cast<std::size_t>(size_));
    std::int64_t mine = n;
    check(who, "MPI_Allgather", MPI_Allgather(&mine, 1, MPI_INT64_T, counts.data(), 1, MPI_INT64_T, comm_));
    return counts;
  }

  /// Concatenates every process's `counts[q]` values in process order into `recv`
  /// (sum(counts) values), `send` holding this process's.
  template <class T>
  void allgatherv(const char* who, const T* send, const std::vector<Index>& counts, T* recv) const {
    std::vector<int> n(counts.size()), at(counts.size());
    Index total = 0;
    for (std::size_t q = 0; q < counts.size(); ++q) {
      n[q] = detail::mpi_count(who, "an all-gather", counts[q]);
      at[q] = detail::mpi_count(who, "an all-gather", total);
      total += counts[q];
    }
    detail::mpi_count(who, "an all-gather", total);
    bytes_sent_ += static_cast<std::uint64_t>(counts[static_cast<std::size_t>(rank_)]) * sizeof(T) *
                   static_cast<std::uint64_t>(size_ - 1);
    check(who, "MPI_Allgatherv",
          MPI_Allgatherv(send, n[static_cast<std::size_t>(rank_)], detail::mpi_type<T>(), recv, n.data(), at.data(),
                         detail::mpi_type<T>(), comm_));
  }

  /// Sends send_counts[q] values to each process q (consecutive in `send`, in process order)
  /// and receives recv_counts[q] values from each (consecutive in `recv`).
  template <class T>
  void alltoallv(const char* who, const T* send, const std::vector<Index>& send_counts, T* recv,
                 const std::vector<Index>& recv_counts) const {
    std::vector<int> sn(send_counts.size()), sat(send_counts.size()), rn(recv_counts.size()), rat(recv_counts.size());
    Index s = 0, r = 0;
    for (std::size_t q = 0; q < send_counts.size(); ++q) {
      sn[q] = detail::mpi_count(who, "an all-to-all", send_counts[q]);
      sat[q] = detail::mpi_count(who, "an all-to-all", s);
      rn[q] = detail::mpi_count(who, "an all-to-all", recv_counts[q]);
      rat[q] = detail::mpi_count(who, "an all-to-all", r);
      s += send_counts[q];
      r += recv_counts[q];
    }
    detail::mpi_count(who, "an all-to-all", s);
    detail::mpi_count(who, "an all-to-all", r);
    bytes_sent_ += static_cast<std::uint64_t>(s - send_counts[static_cast<std::size_t>(rank_)]) * sizeof(T);
    check(who, "MPI_Alltoallv",
          MPI_Alltoallv(send, sn.data(), sat.data(), detail::mpi_type<T>(), recv, rn.data(), rat.data(),
                        detail::mpi_type<T>(), comm_));
  }

  /// Reduce-scatter with a fixed order: `send` holds this process's contribution to every
  /// process's part (counts[q] values for process q, in process order); `recv` (counts[rank]
  /// values) gets the sum of all processes' contributions to this process's part, added in
  /// process order 0, 1, ..., P-1: the same bits on every run. `scratch` is reused.
  template <class T>
  void reduce_scatter_ordered(const char* who, const T* send, const std::vector<Index>& counts, T* recv,
                              std::vector<T>& scratch) const {
    const Index mine = counts[static_cast<std::size_t>(rank_)];
    std::vector<Index> from(static_cast<std::size_t>(size_), mine);
    scratch.resize(static_cast<std::size_t>(mine) * static_cast<std::size_t>(size_));
    alltoallv(who, send, counts, scratch.data(), from);
    for (Index i = 0; i < mine; ++i) recv[i] = scratch[static_cast<std::size_t>(i)];
    for (int q = 1; q < size_; ++q) {
      const T* part = scratch.data() + static_cast<std::size_t>(q) * static_cast<std::size_t>(mine);
      for (Index i = 0; i < mine; ++i) recv[i] += part[i];
    }
  }

  /// data (n values, the same n on every process) <- its sum over the group, every element
  /// added in process order: the same bits on every process and every run. Reduce-scatter
  /// then all-gather, 2 (P-1)/P n values sent per process.
  template <class T>
  void sum_ordered(const char* who, T* data, Index n) const {
    if (size_ == 1) return;
    std::vector<Index> counts(static_cast<std::size_t>(size_));
    for (int q = 0; q < size_; ++q) counts[q] = (n * (q + 1)) / size_ - (n * q) / size_;
    std::vector<T> part(static_cast<std::size_t>(counts[static_cast<std::size_t>(rank_)])), scratch;
    reduce_scatter_ordered(who, data, counts, part.data(), scratch);
    allgatherv(who, part.data(), counts, data);
  }

  /// Throws std::runtime_error for an MPI error code (the group's communicator returns
  /// errors instead of aborting).
  static void check(const char* who, const char* call, int code) {
    if (code == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(code, text, &len);
    throw std::runtime_error(std::string(who) + ": " + call + " failed: " + std::string(text, static_cast<std::size_t>(len)));
  }

 private:
  static int mpi_count_of(const char* who, Index n) { return detail::mpi_count(who, "a message", n); }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  mutable std::uint64_t bytes_sent_ = 0;
};

}  // namespace pkm::distributed
