// Catch2's implementation, compiled once for every test program of the suite (pkm_tests and
// pkm_mpi_tests link this object; each has a main of its own). It is the slowest translation
// unit of the suite when optimised or instrumented (21 s at -O3, 89 s at -O1 under the
// sanitizers on the 2-core VM) and is not pkm's code, so it is built without either.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

namespace pkmtest {
/// Runs every test the program holds (its main calls this; Catch's Session is declared only
/// where its implementation is compiled).
int run_catch(int argc, char** argv) { return Catch::Session().run(argc, argv); }
}  // namespace pkmtest
