// The small ops, each against its formula and its backward against central finite
// differences: pkm/softmax.hpp (per-head softmax), pkm/qk_norm.hpp (v / |v|),
// pkm/activations.hpp (sigmoid, SiLU and its derivative).
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <vector>

#include <pkm/activations.hpp>
#include <pkm/qk_norm.hpp>
#include <pkm/softmax.hpp>
#include <pkm/types.hpp>

using pkm::Index;

namespace {
/// Central difference of f at x[i].
template <class F>
double numeric(std::vector<double> x, std::size_t i, F&& f, double eps = 1e-6) {
  x[i] += eps;
  const double fp = f(x);
  x[i] -= 2 * eps;
  return (fp - f(x)) / (2 * eps);
}
}  // namespace

TEST_CASE("softmax equals exp(z) / sum exp(z), stably, and its backward finite differences",
          "[softmax]") {
  const std::vector<double> z = {0.3, -1.2, 2.5, 0.0, 2.5};
  std::vector<double> w(5), dz(5);
  pkm::softmax_forward(z.data(), 5, w.data());
  double s = 0;
  for (double v : z) s += std::exp(v);
  for (std::size_t i = 0; i < 5; ++i) CHECK(w[i] == Approx(std::exp(z[i]) / s).epsilon(1e-14));
  // Large scores do not overflow: the max is subtracted first.
  const std::vector<double> big = {1000.0, 999.0};
  std::vector<double> wb(2);
  pkm::softmax_forward(big.data(), 2, wb.data());
  CHECK(wb[0] == Approx(1.0 / (1.0 + std::exp(-1.0))));
  const std::vector<double> dw = {0.5, -0.1, 0.7, 1.1, -0.4};
  pkm::softmax_backward(w.data(), dw.data(), 5, dz.data());
  auto loss = [&](const std::vector<double>& zz) {
    std::vector<double> ww(5);
    pkm::softmax_forward(zz.data(), 5, ww.data());
    double l = 0;
    for (std::size_t i = 0; i < 5; ++i) l += ww[i] * dw[i];
    return l;
  };
  for (std::size_t i = 0; i < 5; ++i) CHECK(dz[i] == Approx(numeric(z, i, loss)).margin(1e-8));
}

TEST_CASE("qk-norm: 1/|v| with the epsilon, and the backward of v / |v| by finite differences",
          "[qk_norm]") {
  const std::vector<double> v = {0.4, -0.3, 1.2, 0.05};
  double ss = 0;
  for (double e : v) ss += e * e;
  const double inv = pkm::qk_inv_norm(v.data(), 4);
  CHECK(inv == Approx(1.0 / std::sqrt(ss + pkm::kQkNormEps)).epsilon(1e-15));
  const std::vector<double> g = {0.9, 0.1, -0.6, 0.3};
  std::vector<double> dv(4);
  pkm::qk_norm_backward(v.data(), inv, g.data(), 4, dv.data());
  auto loss = [&](const std::vector<double>& vv) {
    const double i = pkm::qk_inv_norm(vv.data(), 4);
    double l = 0;
    for (std::size_t k = 0; k < 4; ++k) l += vv[k] * i * g[k];
    return l;
  };
  for (std::size_t i = 0; i < 4; ++i) CHECK(dv[i] == Approx(numeric(v, i, loss)).margin(1e-8));
  // out may alias g.
  std::vector<double> inplace = g;
  pkm::qk_norm_backward(v.data(), inv, inplace.data(), 4, inplace.data());
  CHECK(inplace == dv);
  // The zero vector: finite, thanks to the epsilon.
  const std::vector<double> zero(4, 0.0);
  CHECK(std::isfinite(pkm::qk_inv_norm(zero.data(), 4)));
}

TEST_CASE(
    "sigmoid and SiLU equal their formulas without overflow, and SiLU's derivative its finite "
    "difference",
    "[activations]") {
  for (double x : {-800.0, -30.0, -2.5, -0.1, 0.0, 0.3, 4.0, 30.0, 800.0}) {
    INFO("x " << x);
    const double s = pkm::sigmoid(x);
    CHECK(std::isfinite(s));
    CHECK(s == Approx(x > 0 ? 1.0 / (1.0 + std::exp(-x)) : std::exp(x) / (1.0 + std::exp(x)))
                   .epsilon(1e-14));
    CHECK(pkm::silu(x) == Approx(x * s).epsilon(1e-14));
    if (std::abs(x) < 50) {
      const std::vector<double> at = {x};
      const double num =
          numeric(at, 0, [](const std::vector<double>& v) { return pkm::silu(v[0]); });
      CHECK(pkm::silu_grad(x) == Approx(num).margin(1e-8));
    }
  }
  CHECK(pkm::sigmoid(1.0f) == Approx(1.0 / (1.0 + std::exp(-1.0))).epsilon(1e-6));
}
