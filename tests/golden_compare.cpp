// golden_compare EXPECTED ACTUAL: exits 0 when ACTUAL (pkm_run's output) matches EXPECTED
// (PyTorch's) within the parity tolerance, 1 otherwise, printing what differs.
#include <cstdio>
#include <exception>

#include "golden.hpp"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: golden_compare EXPECTED.safetensors ACTUAL.safetensors\n");
    return 2;
  }
  try {
    const pkm::io::SafetensorsFile expected(argv[1]), actual(argv[2]);
    const auto r = pkmtest::compare_parity(expected, actual);
    for (const auto& f : r.failures) std::fprintf(stderr, "%s\n", f.c_str());
    std::printf(
        "%zu tensors compared, worst relative error %.3g (%s), %lld tied index positions: %s\n",
        expected.tensors().size(), r.worst_rel, r.worst_tensor.c_str(), r.tied_positions,
        r.failures.empty() ? "match" : "MISMATCH");
    return r.failures.empty() ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "golden_compare: %s\n", e.what());
    return 2;
  }
}
