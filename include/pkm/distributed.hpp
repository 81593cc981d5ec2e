// pkm/distributed.hpp — memory parallelism over MPI: one value table split by columns over a
// group of processes (target pkm::mpi; docs/distributed.md). Checkpoints of such layers are
// in pkm/distributed/checkpoint.hpp (needs pkm::io as well).
#pragma once

#include "pkm/distributed/column_shards.hpp"
#include "pkm/distributed/group.hpp"
#include "pkm/distributed/memory_parallel_layer.hpp"
#include "pkm/distributed/sharded_read.hpp"
#include "pkm/distributed/slot_statistics.hpp"
