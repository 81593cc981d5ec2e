// Helpers of the MPI tests: the layer, the tokens of each process (made from seeds, so every
// process can compute any process's reference), the splits used.
#pragma once

#include <mpi.h>

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <string>
#include <random>
#include <vector>

#include <pkm/distributed.hpp>
#include <pkm/pkm.hpp>

#include "../support.hpp"

namespace mpitest {

using pkm::Index;
using Mat = pkm::RowMatrix<float>;
namespace dist = pkm::distributed;
using pkmtest::same_bits;

inline int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
inline int world_size() {
  int n = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

inline pkm::MemoryConfig config() {
  pkm::MemoryConfig c;
  c.input_dim = 24;
  c.heads = 2;
  c.n_keys = 8;
  c.k_dim = 8;
  c.knn = 4;
  c.v_dim = 37;  // 19 + 18 over 2 processes, 13 + 12 + 12 over 3
  c.output_dim = 20;
  c.gating = true;
  return c;
}

/// Process q's tokens: a different count on each (process 2 of 3 has none in some tests).
inline Index tokens_of(int q, bool empty_last) {
  if (empty_last && q == world_size() - 1 && q > 0) return 0;
  return 5 + 4 * q;
}
inline Mat random_matrix(Index rows, Index cols, std::uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  Mat m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = u(g);
  return m;
}
inline Mat input_of(int q, bool empty_last) {
  return random_matrix(tokens_of(q, empty_last), config().input_dim, 100 + q);
}
inline Mat dout_of(int q, bool empty_last) {
  return random_matrix(tokens_of(q, empty_last), config().output_dim, 200 + q);
}

/// ||a - b|| / max(||b||, tiny): the backward's tolerance is on this.
template <class A, class B>
double rel_error(const A& a, const B& b) {
  const double d = (a.template cast<double>() - b.template cast<double>()).norm();
  const double n = b.template cast<double>().norm();
  return d / std::max(n, 1e-30);
}

/// The split of v_dim columns the tests use: even, or an uneven one.
inline dist::ColumnShards split(bool uneven) {
  const int P = world_size();
  if (!uneven || P == 1) return dist::ColumnShards::even(config().v_dim, P);
  if (P == 2) return dist::ColumnShards::from_offsets({0, 5, 37});
  std::vector<Index> o{0, 1, 30};
  for (int q = 3; q < P; ++q) o.push_back(30 + q - 2);
  o.push_back(37);
  return dist::ColumnShards::from_offsets(o);
}

/// columns [c0, c0 + w) of a sparse gradient's rows, as a dense matrix over its row ids.
inline Mat columns(const pkm::SparseRowGrad<float>& g, Index c0, Index w) {
  return g.values.middleCols(c0, w);
}

/// One folder for the whole group (process 0 makes it), removed with everything in it.
struct GroupDir {
  std::string path;
  GroupDir() {
    char dir[256] = {0};
    if (world_rank() == 0) {
      std::snprintf(dir, sizeof dir, "%s", "/tmp/pkm-mpi-faults-XXXXXX");
      if (mkdtemp(dir) == nullptr) dir[0] = '\0';
    }
    MPI_Bcast(dir, sizeof dir, MPI_CHAR, 0, MPI_COMM_WORLD);
    path = dir;
  }
  ~GroupDir() {
    MPI_Barrier(MPI_COMM_WORLD);
    if (world_rank() == 0 && !path.empty()) std::filesystem::remove_all(path);
  }
};

}  // namespace mpitest
