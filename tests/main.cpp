// pkm_tests' main: Catch2's session (its implementation is tests/catch_session.cpp).
namespace pkmtest {
int run_catch(int argc, char** argv);
}

int main(int argc, char** argv) { return pkmtest::run_catch(argc, argv); }
