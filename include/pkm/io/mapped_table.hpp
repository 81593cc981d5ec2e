// pkm/io/mapped_table.hpp — how a layer reads a value table mapped from its checkpoint file.
//
// load_layer_mapped views the table in the file's mapping; the kernel brings each page in on
// the first touch (a page fault). That is free while the file sits in the page cache, and slow
// when it does not (a cold start, or a table larger than RAM): each fault waits for its own
// read, one at a time, and reads a window of pages around the one touched. The key search
// knows every row a forward will read before the read starts, so the layer's RowFetch hook
// (pkm/row_fetch.hpp) can ask the disk for all of them at once:
//
//   TableFetch::page_faults   the kernel's default: fault in, with read-around
//   TableFetch::random        faults read only the page touched (madvise MADV_RANDOM)
//   TableFetch::early         as random, and the rows a forward will read are requested with
//                             posix_fadvise(WILLNEED) as soon as the search has chosen them, so
//                             their reads are in flight together while the read runs; when
//                             8 rows sampled from the forward's are all in memory already
//                             (mincore), the table is taken to be warm and nothing is requested
//
// Whatever the choice, each forward first checks that the file has not been truncated or
// rewritten since it was opened (SafetensorsFile::check_unchanged): a runtime_error instead of
// SIGBUS. docs/serving.md has the measurements behind the choice.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "pkm/io/safetensors_file.hpp"
#include "pkm/row_fetch.hpp"
#include "pkm/types.hpp"

namespace pkm::io {

/// How a mapped table's rows come from the disk (see above).
enum class TableFetch { page_faults, random, early };

/// "page_faults", "random" or "early".
inline const char* table_fetch_name(TableFetch f) {
  switch (f) {
    case TableFetch::page_faults: return "page_faults";
    case TableFetch::random: return "random";
    case TableFetch::early: return "early";
  }
  return "?";
}

/// The RowFetch hook of a layer whose table is tensor `table` of the mapped file: `rows` rows
/// of `row_bytes` bytes each. It holds a copy of the file, so the mapping lives as long as the
/// layer. Thread-safe (it only reads its own members and makes system calls).
class MappedTableFetch {
 public:
  MappedTableFetch(SafetensorsFile file, const TensorInfo& table, Index rows,
                   std::uint64_t row_bytes, TableFetch fetch)
      : file_(std::move(file)), table_(table), rows_(rows), row_bytes_(row_bytes), fetch_(fetch) {
    if (rows < 0 || (rows > 0 && row_bytes > (table.end - table.begin) / std::uint64_t(rows))) {
      throw std::invalid_argument("pkm::io::MappedTableFetch: " + std::to_string(rows) +
                                  " rows of " + std::to_string(row_bytes) +
                                  " bytes do not fit tensor '" + table.name + "' of " +
                                  std::to_string(table.end - table.begin) + " bytes");
    }
    if (fetch_ != TableFetch::page_faults) file_.advise_random(table_);
  }

  void operator()(const Index* rows, Index count) const {
    file_.check_unchanged();
    if (fetch_ != TableFetch::early || count == 0 || sampled_resident(rows, count)) return;
    for (Index i = 0; i < count; ++i) {
      const Index r = rows[i];
      if (r >= 0 && r < rows_)  // a row out of range is the read's to refuse
        file_.will_need(table_, std::uint64_t(r) * row_bytes_, row_bytes_);
    }
  }

 private:
  /// Whether kSample rows spread evenly over the list are all in memory already: then the
  /// table is taken to be warm and no fetch is requested (a system call per row costs as much
  /// as the read of a cached row). A few cold rows the sample misses are faulted in.
  bool sampled_resident(const Index* rows, Index count) const {
    constexpr Index kSample = 8;
    const Index step = std::max<Index>(1, count / kSample);
    for (Index i = step / 2; i < count; i += step) {
      const Index r = rows[i];
      if (r < 0 || r >= rows_) continue;
      if (!file_.resident(table_, std::uint64_t(r) * row_bytes_, row_bytes_)) return false;
    }
    return true;
  }

  SafetensorsFile file_;
  TensorInfo table_;
  Index rows_;
  std::uint64_t row_bytes_;
  TableFetch fetch_;
};

}  // namespace pkm::io
