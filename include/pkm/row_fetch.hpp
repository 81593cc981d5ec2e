// pkm/row_fetch.hpp — a layer's hook between its key search and its read.
//
// The key search knows which table rows a forward will read before the read starts. A layer
// with a RowFetch set (MemoryLayer::set_row_fetch) hands it those rows at that moment, so
// that storage slower than memory can be asked for them early: pkm::io's mapped tables use it
// to check that the file is still the one mapped and to request the rows from the disk at
// once (pkm/io/mapped_table.hpp); a caller may use it to bring rows from its own storage into
// a table the layer views.
#pragma once

#include <functional>

#include "pkm/types.hpp"

namespace pkm {

/// Called by each forward of a layer it is set on with the table rows the read is about to
/// touch: the key search's indices, `count` = batch x heads x knn of them in token order,
/// repeats included, each in [0, table rows). It runs on the forward's calling thread after
/// the search and before the read, so concurrent forwards call it concurrently. It may throw
/// to refuse the read: the forward then throws that exception, its output left unwritten and
/// its cache marked unfilled.
using RowFetch = std::function<void(const Index* rows, Index count)>;

}  // namespace pkm
