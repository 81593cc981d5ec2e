// Compares pkm's outputs with PyTorch's expected ones (tests/data/*.expected.safetensors).
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <pkm/io/safetensors.hpp>

namespace pkmtest {

/// Relative tolerance of fp32 parity: max |actual - expected| over a tensor, divided by the
/// tensor's max |expected|.
inline constexpr double kParityRtol = 1e-5;

struct ParityReport {
  std::vector<std::string> failures;
  double worst_rel = 0;  // the largest relative error over all float tensors
  std::string worst_tensor;
  long long tied_positions = 0;  // index positions skipped because their scores tie
};

/// Every tensor of `expected` must be in `actual` with the same shape; floats within
/// kParityRtol; indices equal wherever the expected scores are not tied (within 1e-6 rel).
inline ParityReport compare_parity(const pkm::io::SafetensorsFile& expected,
                                   const pkm::io::SafetensorsFile& actual) {
  ParityReport r;
  for (const auto& e : expected.tensors()) {
    if (!actual.has(e.name)) {
      r.failures.push_back("missing output '" + e.name + "'");
      continue;
    }
    const auto& a = actual.info(e.name);
    if (a.shape != e.shape) {
      r.failures.push_back("'" + e.name + "': shape " + a.shape_string() + ", expected " +
                           e.shape_string());
      continue;
    }
    if (e.name == "indices") {
      const auto ei = expected.read<std::int64_t>("indices"),
                 ai = actual.read<std::int64_t>("indices");
      const auto es = expected.read<double>("scores");
      const std::size_t k = static_cast<std::size_t>(e.shape.back());
      for (std::size_t p = 0; p < ei.size(); ++p) {
        if (ei[p] == ai[p]) continue;
        const std::size_t m = p % k;
        auto tied = [&](std::size_t q) {
          return std::abs(es[q] - es[p]) <= 1e-6 * std::abs(es[p]);
        };
        if ((m > 0 && tied(p - 1)) || (m + 1 < k && tied(p + 1))) {
          ++r.tied_positions;
          continue;
        }
        r.failures.push_back("indices[" + std::to_string(p) + "] = " + std::to_string(ai[p]) +
                             ", expected " + std::to_string(ei[p]));
      }
      continue;
    }
    const auto ev = expected.read<double>(e.name), av = actual.read<double>(e.name);
    double scale = 0, err = 0;
    for (std::size_t i = 0; i < ev.size(); ++i) {
      scale = std::max(scale, std::abs(ev[i]));
      err = std::max(err, std::abs(ev[i] - av[i]));
    }
    const double rel = scale > 0 ? err / scale : err;
    if (rel > r.worst_rel) {
      r.worst_rel = rel;
      r.worst_tensor = e.name;
    }
    if (!(rel <= kParityRtol)) {
      r.failures.push_back("'" + e.name + "': max relative error " + std::to_string(rel));
    }
  }
  return r;
}

}  // namespace pkmtest
