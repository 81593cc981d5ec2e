// The MPI tests' main: MPI around a Catch2 session (its implementation is
// tests/catch_session.cpp). Every process runs every test case (they are collective); mpirun
// fails when any process fails.
#include <mpi.h>

namespace pkmtest {
int run_catch(int argc, char** argv);
}

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  const int failed = pkmtest::run_catch(argc, argv);
  MPI_Finalize();
  return failed;
}
