// pkm/memory_output.hpp on its own: the output op (Memory+, plain projection, none; with and
// without the gate) against the formulas in plain loops, and its backward (dy, every
// parameter's gradient, dx) against central finite differences of sum(dout * out).
#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include <pkm/init.hpp>
#include <pkm/memory_output.hpp>

#include "support.hpp"

using pkm::Index;
using pkmtest::Mat;
using pkmtest::random_matrix;
using pkmtest::ref_sigmoid;

namespace {

pkm::MemoryConfig output_config(bool memory_plus, bool projection, bool gating) {
  pkm::MemoryConfig c = pkmtest::small_config();
  c.memory_plus = memory_plus;
  c.value_projection = projection;
  c.gating = gating;
  if (!projection) c.output_dim = c.v_dim;
  return c;
}

/// out from the formulas: W2 (y * silu(W1 x + b1)) + b2, W2 y + b2 or y; times sigmoid(wg x + bg).
Mat reference_output(const pkm::LayerParameters<double>& p, const Mat& x, const Mat& y) {
  const pkm::MemoryConfig& c = p.config();
  Mat out(x.rows(), c.output_dim);
  for (Index b = 0; b < x.rows(); ++b) {
    std::vector<double> u(y.row(b).data(), y.row(b).data() + c.v_dim);
    if (c.memory_plus) {
      for (Index d = 0; d < c.v_dim; ++d) {
        double g = p.swilu_bias()[d];
        for (Index e = 0; e < c.input_dim; ++e) g += p.swilu_weight()(d, e) * x(b, e);
        u[d] = y(b, d) * g * ref_sigmoid(g);
      }
    }
    double gate = 1.0;
    if (c.gating) {
      double t = p.gate_bias();
      for (Index e = 0; e < c.input_dim; ++e) t += p.gate_weight()[e] * x(b, e);
      gate = ref_sigmoid(t);
    }
    for (Index j = 0; j < c.output_dim; ++j) {
      double v = c.value_projection ? p.value_proj_bias()[j] : u[j];
      if (c.value_projection) {
        for (Index d = 0; d < c.v_dim; ++d) v += p.value_proj_weight()(j, d) * u[d];
      }
      out(b, j) = gate * v;
    }
  }
  return out;
}

}  // namespace

TEST_CASE("the output op equals its formula and its backward finite differences, in every mode",
          "[memory_output]") {
  struct Mode {
    bool memory_plus, projection, gating;
  };
  for (const Mode m :
       {Mode{true, true, false}, Mode{true, true, true}, Mode{false, true, false},
        Mode{false, true, true}, Mode{false, false, false}, Mode{false, false, true}}) {
    INFO("memory_plus " << m.memory_plus << " projection " << m.projection << " gating "
                        << m.gating);
    const pkm::MemoryConfig c = output_config(m.memory_plus, m.projection, m.gating);
    pkm::LayerParameters<double> p(c);
    pkm::init_parameters(p, 3);
    p.for_each(
        [](pkm::Tensor, pkm::MatrixMap<double> t) { t.array() += 0.1; });  // non-zero biases too
    const Index B = 5;
    Mat x = random_matrix(B, c.input_dim, 1), y = random_matrix(B, c.v_dim, 2);
    const Mat dout = random_matrix(B, c.output_dim, 3);
    auto forward = [&] {
      Mat out(B, c.output_dim);
      pkm::OutputCache<double> cache;
      pkm::output_forward<double>(p, x, y, out, cache);
      return out;
    };
    CHECK((forward() - reference_output(p, x, y)).cwiseAbs().maxCoeff() < 1e-12);

    // The backward.
    Mat out(B, c.output_dim);
    pkm::OutputCache<double> cache;
    pkm::output_forward<double>(p, x, y, out, cache);
    pkm::OutputWorkspace<double> ws;
    Mat dy(B, c.v_dim);
    pkm::output_backward<double>(p, y, cache, dout, dy, ws);
    pkm::LayerParameters<double> dp(c);
    dp.set_zero();
    pkm::output_backward_weights<double>(p, x, y, cache, dout, ws, dp);
    Mat dx = Mat::Zero(B, c.input_dim);
    pkm::output_backward_input<double>(p, ws, dx);
    auto loss = [&](bool*) { return (forward().array() * dout.array()).sum(); };
    std::vector<std::string> fails;
    auto fd = [&](double* target, Index n, const double* analytic, const std::string& what) {
      pkmtest::check_fd(target, n, std::vector<double>(analytic, analytic + n), loss, fails, what);
    };
    fd(y.data(), y.size(), dy.data(), "dy");
    fd(x.data(), x.size(), dx.data(), "dx");
    for (pkm::Tensor t :
         {pkm::Tensor::swilu_weight, pkm::Tensor::swilu_bias, pkm::Tensor::value_proj_weight,
          pkm::Tensor::value_proj_bias, pkm::Tensor::gate_weight, pkm::Tensor::gate_bias}) {
      if (!p.has(t)) continue;
      fd(p.data(t), p.matrix(t).size(), dp.data(t), pkm::tensor_name(t));
    }
    for (const auto& f : fails) FAIL_CHECK(f);
  }
}
