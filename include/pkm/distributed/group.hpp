// pkm/distributed/group.hpp — a group of processes sharing one memory layer (memory
// parallelism), over MPI: the collectives pkm needs, each with a fixed summation order, and
// the agreement that turns an error on one process into the same exception on every process
// (never a hang, never one process going on alone).
//
// Needs MPI (the CMake target pkm::mpi); the rest of pkm never does.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <exception>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "pkm/distributed/detail/wire.hpp"
#include "pkm/errors.hpp"
#include "pkm/types.hpp"

namespace pkm::distributed {

/// A group of processes: a duplicate of the caller's communicator (so pkm's messages never
/// mix with the caller's), made and freed collectively. MPI must be initialised first and
/// finalised after the group is destroyed. Not copyable; layers keep a pointer to it, so it
/// must outlive them. One thread at a time per group (MPI_THREAD_FUNNELED is enough).
///
/// Every pkm call on a group opens with an agreement: one small all-reduce of the same fixed
/// size for every call, carrying which call this process is in (its name and phase), its
/// position in the group's sequence of calls, whether its local checks failed, and the
/// fingerprints it must share with the others. Processes in different calls are detected
/// there and told which process is in which call; nothing else is exchanged first. The data
/// that follows (all-gathers, all-to-alls) moves in MPI messages of at most
/// `max_message_elements` elements each (MPI counts are ints: larger transfers are split).
class Group {
 public:
  /// The largest MPI message the group sends by default: MPI's int counts.
  static constexpr Index kMaxMessageElements = INT_MAX;

  /// Collective over `comm`. max_message_elements (1 .. INT_MAX, the same on every process)
  /// bounds the elements of one MPI message; transfers above it are split into several (the
  /// default is what MPI allows; smaller values exist to test the split).
  explicit Group(MPI_Comm comm, Index max_message_elements = kMaxMessageElements) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) {
      throw std::runtime_error(
          "pkm::distributed::Group: MPI is not initialised; call MPI_Init first");
    }
    if (comm == MPI_COMM_NULL)
      throw std::invalid_argument("pkm::distributed::Group: comm is MPI_COMM_NULL");
    check("pkm::distributed::Group", "MPI_Comm_dup", MPI_Comm_dup(comm, &comm_));
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    const char* who = "pkm::distributed::Group";
    try {
      collectively(who, Op::construct, [&] {
        if (max_message_elements < 1 || max_message_elements > kMaxMessageElements) {
          throw std::invalid_argument(std::string(who) + ": max_message_elements = " +
                                      std::to_string(max_message_elements) + ", expected 1 .. " +
                                      std::to_string(kMaxMessageElements));
        }
      });
      message_limit_ = max_message_elements;
      require_same(who,
                   {{"max_message_elements", static_cast<std::uint64_t>(max_message_elements)}});
    } catch (...) {
      MPI_Comm_free(&comm_);
      throw;
    }
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
  /// The most elements one MPI message of the group carries.
  Index max_message_elements() const { return message_limit_; }
  /// Agreements (collective pkm calls and their phases) this group has made.
  std::uint64_t calls() const { return sequence_; }

  /// Point-to-point messages this process has posted (sends and receives of the split path,
  /// all-to-alls); with a small max_message_elements, more.
  std::uint64_t messages() const { return messages_; }

  /// Bytes of payload this process has sent to other processes through the group's data
  /// collectives (all-gathers, all-to-alls, reductions; not the small agreement messages),
  /// counted as a point-to-point implementation sends them: what docs/distributed.md's
  /// formulas give. For measuring traffic per token.
  std::uint64_t bytes_sent() const { return bytes_sent_; }

  /// Runs local() (which may throw), then agrees with every process of the group: all must
  /// be in the same call — the same `who` and `op`, at the same position in the group's
  /// sequence of calls — else every process throws std::runtime_error naming which process is
  /// in which call. If local() threw on any process, every process throws: each failing
  /// process its own exception, the others one of the same type as the first failing
  /// process's (std::invalid_argument, std::out_of_range or std::runtime_error) that names it
  /// and carries its message.
  template <class F>
  void collectively(const char* who, Op op, F&& local) const {
    std::exception_ptr error;
    std::string message;
    try {
      local();
    } catch (const std::exception& e) {
      error = std::current_exception(), message = e.what();
    } catch (...) {
      error = std::current_exception(), message = "an exception that is not a std::exception";
    }
    const Outcome o = agree(who, op, "", error != nullptr, {});
    if (o.first_failed < 0) return;
    // The first failing process's error kind (pkm/errors.hpp) and message travel to the others.
    std::int64_t head[2] = {error ? static_cast<std::int64_t>(error_kind(error)) : 0,
                            static_cast<std::int64_t>(message.size())};
    check(who, "MPI_Bcast", MPI_Bcast(head, 2, MPI_INT64_T, o.first_failed, comm_));
    message.resize(static_cast<std::size_t>(head[1]));
    check(who, "MPI_Bcast",
          MPI_Bcast(message.data(), detail::mpi_count(who, "a message", head[1]), MPI_CHAR,
                    o.first_failed, comm_));
    if (error) std::rethrow_exception(error);  // each failing process reports its own error
    std::string text =
        std::string(who) + ": process " + std::to_string(o.first_failed) + " of the group failed";
    if (o.last_failed != o.first_failed) {
      text += " (processes " + std::to_string(o.first_failed) + " to " +
              std::to_string(o.last_failed) + " failed, each reports its own error)";
    }
    throw_error(static_cast<ErrorKind>(head[0]), text + " (every process throws): " + message);
  }

  /// Throws std::invalid_argument on every process unless every item's fingerprint is the
  /// same on all processes; the message names each item that differs. Up to kMaxAgreed
  /// items. An agreement of its own in the group's sequence of calls (see collectively).
  static constexpr std::size_t kMaxAgreed = 6;
  void require_same(const char* who, const std::vector<Agreed>& items) const {
    const Outcome o = agree(who, Op::same, items.empty() ? "" : items.front().what, false, items);
    std::string differ;
    for (std::size_t i = 0; i < items.size(); ++i) {
      if (!o.same[i]) differ += (differ.empty() ? "" : ", ") + items[i].what;
    }
    if (!differ.empty()) {
      throw std::invalid_argument(std::string(who) + ": the processes of the group disagree on " +
                                  differ + "; expected the same on every process");
    }
  }
  void require_same(const char* who, const std::string& what, std::uint64_t fingerprint) const {
    require_same(who, {{what, fingerprint}});
  }

  /// counts[q] = n on process q, on every process.
  std::vector<Index> allgather_count(const char* who, Index n) const {
    std::vector<Index> counts(static_cast<std::size_t>(size_));
    std::int64_t mine = n;
    check(who, "MPI_Allgather",
          MPI_Allgather(&mine, 1, MPI_INT64_T, counts.data(), 1, MPI_INT64_T, comm_));
    return counts;
  }

  /// Every process's string, in process order, on every process.
  std::vector<std::string> allgather_string(const char* who, const std::string& s) const {
    const std::vector<Index> lengths = allgather_count(who, static_cast<Index>(s.size()));
    Index total = 0;
    for (Index n : lengths) total = detail::checked_sum(who, "the strings' lengths", total, n);
    std::string all(static_cast<std::size_t>(total), '\0');
    allgatherv(who, s.data(), lengths, all.data());
    std::vector<std::string> out;
    std::size_t at = 0;
    for (Index n : lengths) {
      out.push_back(all.substr(at, static_cast<std::size_t>(n)));
      at += static_cast<std::size_t>(n);
    }
    return out;
  }

  /// Concatenates every process's `counts[q]` values in process order into `recv`
  /// (sum(counts) values), `send` holding this process's. `counts` must be the same on every
  /// process (allgather_count makes it so).
  template <class T>
  void allgatherv(const char* who, const T* send, const std::vector<Index>& counts, T* recv) const {
    std::vector<Index> at(counts.size());
    Index total = 0;
    bool fits = true;
    for (std::size_t q = 0; q < counts.size(); ++q) {
      at[q] = total;
      total = detail::checked_sum(who, "an all-gather's elements", total, counts[q]);
      fits = fits && counts[q] <= message_limit_ && at[q] <= message_limit_;
    }
    const auto me = static_cast<std::size_t>(rank_);
    bytes_sent_ +=
        static_cast<std::uint64_t>(counts[me]) * sizeof(T) * static_cast<std::uint64_t>(size_ - 1);
    if (fits) {  // one MPI call; the same decision on every process (the counts are the same)
      std::vector<int> n(counts.size()), displ(counts.size());
      for (std::size_t q = 0; q < counts.size(); ++q)
        n[q] = static_cast<int>(counts[q]), displ[q] = static_cast<int>(at[q]);
      check(who, "MPI_Allgatherv",
            MPI_Allgatherv(send, n[me], detail::mpi_type<T>(), recv, n.data(), displ.data(),
                           detail::mpi_type<T>(), comm_));
      return;
    }
    // Above MPI's counts: point to point, each block in messages of at most the limit.
    std::copy(send, send + counts[me], recv + at[me]);
    detail::Exchange x(comm_, message_limit_, messages_, who);
    for (int q = 0; q < size_; ++q) {
      if (q == rank_) continue;
      x.receive(q, recv + at[static_cast<std::size_t>(q)], counts[static_cast<std::size_t>(q)]);
      x.send(q, send, counts[me]);
    }
    x.wait();
  }

  /// Sends send_counts[q] values to each process q (consecutive in `send`, in process order)
  /// and receives recv_counts[q] values from each (consecutive in `recv`). Point to point, in
  /// messages of at most max_message_elements() elements: no int count or offset limits.
  template <class T>
  void alltoallv(const char* who, const T* send, const std::vector<Index>& send_counts, T* recv,
                 const std::vector<Index>& recv_counts) const {
    std::vector<Index> sat(send_counts.size()), rat(recv_counts.size());
    Index s = 0, r = 0;
    for (std::size_t q = 0; q < send_counts.size(); ++q) {
      sat[q] = s;
      rat[q] = r;
      s = detail::checked_sum(who, "an all-to-all's elements", s, send_counts[q]);
      r = detail::checked_sum(who, "an all-to-all's elements", r, recv_counts[q]);
    }
    const auto me = static_cast<std::size_t>(rank_);
    bytes_sent_ += static_cast<std::uint64_t>(s - send_counts[me]) * sizeof(T);
    if (recv_counts[me] != send_counts[me]) {
      throw std::logic_error(
          std::string(who) + ": an all-to-all sends " + std::to_string(send_counts[me]) +
          " values to this process and receives " + std::to_string(recv_counts[me]));
    }
    std::copy(send + sat[me], send + sat[me] + send_counts[me], recv + rat[me]);
    detail::Exchange x(comm_, message_limit_, messages_, who);
    for (int q = 0; q < size_; ++q) {
      if (q == rank_) continue;
      const auto u = static_cast<std::size_t>(q);
      x.receive(q, recv + rat[u], recv_counts[u]);
      x.send(q, send + sat[u], send_counts[u]);
    }
    x.wait();
  }

  /// Reduce-scatter with a fixed order: `send` holds this process's contribution to every
  /// process's part (counts[q] values for process q, in process order); `recv` (counts[rank]
  /// values) gets the sum of all processes' contributions to this process's part, added in
  /// process order 0, 1, ..., P-1: the same bits on every run. `scratch` is reused. Integer
  /// sums wrap instead of overflowing (callers that sum counters check their totals first).
  template <class T>
  void reduce_scatter_ordered(const char* who, const T* send, const std::vector<Index>& counts,
                              T* recv, std::vector<T>& scratch) const {
    const Index mine = counts[static_cast<std::size_t>(rank_)];
    std::vector<Index> from(static_cast<std::size_t>(size_), mine);
    scratch.resize(static_cast<std::size_t>(mine) * static_cast<std::size_t>(size_));
    alltoallv(who, send, counts, scratch.data(), from);
    for (Index i = 0; i < mine; ++i) recv[i] = scratch[static_cast<std::size_t>(i)];
    for (int q = 1; q < size_; ++q) {
      const T* part = scratch.data() + static_cast<std::size_t>(q) * static_cast<std::size_t>(mine);
      for (Index i = 0; i < mine; ++i) {
        if constexpr (std::is_integral_v<T>) {
          using U = std::make_unsigned_t<T>;
          recv[i] = static_cast<T>(static_cast<U>(recv[i]) + static_cast<U>(part[i]));
        } else {
          recv[i] += part[i];
        }
      }
    }
  }

  /// data (n values, the same n on every process) <- its sum over the group, every element
  /// added in process order: the same bits on every process and every run. Reduce-scatter
  /// then all-gather, 2 (P-1)/P n values sent per process.
  template <class T>
  void sum_ordered(const char* who, T* data, Index n) const {
    if (size_ == 1) return;
    std::vector<Index> counts(static_cast<std::size_t>(size_));
    for (int q = 0; q < size_; ++q)
      counts[q] = detail::split_point(n, q + 1, size_) - detail::split_point(n, q, size_);
    std::vector<T> part(static_cast<std::size_t>(counts[static_cast<std::size_t>(rank_)])), scratch;
    reduce_scatter_ordered(who, data, counts, part.data(), scratch);
    allgatherv(who, part.data(), counts, data);
  }

  /// Throws std::runtime_error for an MPI error code (the group's communicator returns
  /// errors instead of aborting).
  static void check(const char* who, const char* call, int code) {
    detail::mpi_check(who, call, code);
  }

 private:
  /// What an agreement found: the lowest and highest failing process (-1: none), and for each
  /// fingerprint whether every process had the same.
  struct Outcome {
    int first_failed = -1, last_failed = -1;
    std::vector<bool> same;
  };

  /// The agreement every collective call opens with (see the class comment): one MPI_Allreduce
  /// (MIN) of a fixed number of words, whatever the call, so that processes in different
  /// calls meet in the same MPI operation and find out.
  Outcome agree(const char* who, Op op, const std::string& detail_name, bool failed,
                const std::vector<Agreed>& items) const {
    if (items.size() > kMaxAgreed) {
      throw std::logic_error(std::string(who) + ": more than " + std::to_string(kMaxAgreed) +
                             " items to agree on");
    }
    const std::uint64_t call = detail::Fingerprint()
                                   .add(std::string(who))
                                   .add(static_cast<std::uint64_t>(op))
                                   .add(detail_name)
                                   .value();
    const std::uint64_t seq = sequence_++;
    constexpr std::size_t kWords = 6 + 2 * kMaxAgreed;
    std::uint64_t v[kWords] = {};
    const auto r = static_cast<std::uint64_t>(rank_);
    v[0] = failed ? r : UINT64_MAX;   // min: the first failing process
    v[1] = failed ? ~r : UINT64_MAX;  // min of ~r: ~(the last failing process)
    v[2] = call, v[3] = ~call;        // min(x) == ~min(~x) = max(x): every process the same
    v[4] = seq, v[5] = ~seq;
    for (std::size_t i = 0; i < items.size(); ++i)
      v[6 + 2 * i] = items[i].fingerprint, v[7 + 2 * i] = ~items[i].fingerprint;
    check(who, "MPI_Allreduce",
          MPI_Allreduce(MPI_IN_PLACE, v, static_cast<int>(kWords), MPI_UINT64_T, MPI_MIN, comm_));
    if (v[2] != ~v[3] || v[4] != ~v[5]) {
      throw_not_in_the_same_call(who, std::string(who) + " (" + op_name(op) +
                                          (detail_name.empty() ? "" : ": " + detail_name) +
                                          ", call " + std::to_string(seq) + " of the group)");
    }
    Outcome o;
    if (v[0] != UINT64_MAX) {
      o.first_failed = static_cast<int>(v[0]);
      o.last_failed = static_cast<int>(~v[1]);
    }
    for (std::size_t i = 0; i < items.size(); ++i) o.same.push_back(v[6 + 2 * i] == ~v[7 + 2 * i]);
    return o;
  }

  /// After an agreement found processes in different calls (every process found it: the
  /// reduced words are the same everywhere): every process learns which process is in which
  /// call, and throws.
  [[noreturn]] void throw_not_in_the_same_call(const char* who, const std::string& mine) const {
    constexpr int kName = 256;
    std::vector<char> names(static_cast<std::size_t>(kName) * static_cast<std::size_t>(size_),
                            '\0');
    char own[kName] = {};
    std::memcpy(own, mine.data(), std::min<std::size_t>(mine.size(), kName - 1));
    check(who, "MPI_Allgather",
          MPI_Allgather(own, kName, MPI_CHAR, names.data(), kName, MPI_CHAR, comm_));
    std::string text = std::string(who) + ": the processes of the group are not in the same call:";
    // Processes in the same call are listed together ("processes 1, 2: ..."), at most 8 calls.
    std::vector<std::string> seen;
    for (int q = 0; q < size_; ++q) {
      const std::string name(names.data() + static_cast<std::size_t>(q) * kName);
      if (std::find(seen.begin(), seen.end(), name) != seen.end()) continue;
      seen.push_back(name);
      if (seen.size() > 8) {
        text += " ...";
        break;
      }
      std::string who_is = "";
      int n = 0;
      for (int p = q; p < size_; ++p) {
        if (name == std::string(names.data() + static_cast<std::size_t>(p) * kName)) {
          who_is += (n++ ? ", " : "") + std::to_string(p);
        }
      }
      text += (seen.size() > 1 ? "; " : " ") + std::string(n > 1 ? "processes " : "process ") +
              who_is + " in " + name;
    }
    throw std::runtime_error(text +
                             ". Every process must make the same pkm calls in the same order");
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  Index message_limit_ = kMaxMessageElements;
  mutable std::uint64_t sequence_ = 0;
  mutable std::uint64_t messages_ = 0;
  mutable std::uint64_t bytes_sent_ = 0;
};

}  // namespace pkm::distributed
