// pkm/value_gradient.hpp — where a backward puts the value table's gradient: a sink, the
// extension point of every backward that forms it (embedding_bag_backward_to, a layer's
// backward_to, the memory-parallel layer's). The backward calls its sink once:
//
//     sink(rows, dim, reduce)
//
// rows: the touched table rows, sorted and unique; dim: the width of a gradient row (a
// process's columns for a sharded table); reduce(u, out) writes the gradient of rows[u] — dim
// values of the layer's scalar — into out. reduce may run on several threads at once, each u
// once; every call gives the same bits. What the sink does with the rows is its own business:
//
//   SparseRowGradSink      merges them into a SparseRowGrad (what backward() returns);
//   pkm::RowAccumulator    sums them in place over several backwards (row_accumulator.hpp);
//   a lambda               puts them in caller-provided storage — a dense gradient, the pages
//                          of a tensor — with reduce_rows_into (the PyTorch operator does).
//
// A sink may also have check(who, table_rows, dim), which the backward calls with its other
// argument checks, before anything is computed or written (SparseRowGradSink validates its
// SparseRowGrad there).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "pkm/detail/aligned_buffer.hpp"
#include "pkm/detail/parallel.hpp"
#include "pkm/sparse_grad.hpp"
#include "pkm/types.hpp"

namespace pkm {

/// Rows per parallel block when a sink reduces rows.
inline constexpr Index kReduceBlock = 16;

/// reduce(u, place(u)) for every u in [0, rows.size()), in parallel blocks of rows (each row by
/// one thread): the whole loop of a sink that only chooses where each row goes.
template <class Reduce, class Place>
void reduce_rows_into(const std::vector<std::int64_t>& rows, Reduce&& reduce, Place&& place) {
  detail::parallel_blocks(static_cast<Index>(rows.size()), kReduceBlock,
                          [&](Index begin, Index end) {
                            for (Index u = begin; u < end; ++u) reduce(u, place(u));
                          });
}

namespace detail {
template <class Sink, class = void>
struct has_check : std::false_type {};
template <class Sink>
struct has_check<Sink, std::void_t<decltype(std::declval<Sink&>().check("", Index{}, Index{}))>>
    : std::true_type {};
}  // namespace detail

/// sink.check(who, table_rows, dim) where the sink has it: a backward's check of its sink.
template <class Sink>
void check_sink(Sink& sink, const char* who, Index table_rows, Index dim) {
  if constexpr (detail::has_check<std::remove_reference_t<Sink>>::value)
    sink.check(who, table_rows, dim);
}

/// The sink behind backward(..., SparseRowGrad& dvalues, ...): the rows merged (added) into
/// dvalues; when dvalues is empty they are written into it directly, else into `scratch` and
/// merged. check() validates dvalues (a SparseRowGrad as backward makes it, of this width).
template <class S>
class SparseRowGradSink {
 public:
  /// `name` is what messages call the target ("dvalues").
  SparseRowGradSink(SparseRowGrad<S>& target, SparseRowGrad<S>& scratch,
                    const char* name = "dvalues")
      : target_(target), scratch_(scratch), name_(name) {}

  void check(const char* who, Index table_rows, Index dim) const {
    target_.validate(who, name_, table_rows);
    if (!target_.empty() && target_.dim != dim) {
      throw std::invalid_argument(std::string(who) + ": " + name_ +
                                  ".dim = " + std::to_string(target_.dim) + ", expected " +
                                  std::to_string(dim) + " (the table's row width)");
    }
  }

  template <class Reduce>
  void operator()(const std::vector<std::int64_t>& rows, Index dim, Reduce&& reduce) {
    SparseRowGrad<S>& into = target_.empty() ? target_ : scratch_;
    into.dim = dim;
    into.rows.assign(rows.begin(), rows.end());
    const bool fresh =
        into.values.rows() != static_cast<Index>(rows.size()) || into.values.cols() != dim;
    into.values.resize(static_cast<Index>(rows.size()), dim);
    // A new gradient of hundreds of MiB is written once: huge pages spare most page faults.
    if (fresh)
      detail::advise_huge_pages(into.values.data(),
                                static_cast<std::size_t>(into.values.size()) * sizeof(S));
    reduce_rows_into(rows, reduce, [&](Index u) { return into.values.row(u).data(); });
    if (&into != &target_) target_.merge(scratch_);
  }

 private:
  SparseRowGrad<S>& target_;
  SparseRowGrad<S>& scratch_;
  const char* name_;
};

}  // namespace pkm
