// The MPI tests' main: MPI around a Catch2 session. Every process runs every test case (they
// are collective); mpirun fails when any process fails.
#define CATCH_CONFIG_RUNNER
#include <mpi.h>

#include <catch2/catch.hpp>

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  const int failed = Catch::Session().run(argc, argv);
  MPI_Finalize();
  return failed;
}
