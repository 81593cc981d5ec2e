// pkm/linear.hpp against plain loops: y = x W^T + b, and its backward (dW += dy^T x,
// db += the batch's sum of dy, dx = dy W or += with accumulate). Linear maps have exact
// gradients, so the loops are the reference.
#include <catch2/catch.hpp>

#include <pkm/linear.hpp>

#include "support.hpp"

using pkm::Index;
using pkmtest::Mat;
using pkmtest::random_matrix;

TEST_CASE("linear forward equals the plain loop, with and without a bias", "[linear]") {
  for (Index B : {Index{0}, Index{1}, Index{7}, Index{130}}) {
    for (bool bias : {false, true}) {
      INFO("B " << B << " bias " << bias);
      const Mat x = random_matrix(B, 9, 1), w = random_matrix(5, 9, 2), b = random_matrix(1, 5, 3);
      Mat y = Mat::Constant(B, 5, std::nan(""));  // every element written, nothing read
      pkm::linear_forward<double>(x, w, bias ? b.data() : nullptr, y);
      double err = 0;
      for (Index r = 0; r < B; ++r) {
        for (Index o = 0; o < 5; ++o) {
          double s = bias ? b(0, o) : 0.0;
          for (Index i = 0; i < 9; ++i) s += x(r, i) * w(o, i);
          err = std::max(err, std::abs(s - y(r, o)));
        }
      }
      CHECK(err < 1e-12);
    }
  }
}

TEST_CASE(
    "linear backward equals the plain loops: weights and bias added to, input written or added to",
    "[linear]") {
  const Index B = 11;
  const Mat x = random_matrix(B, 6, 4), w = random_matrix(4, 6, 5), dy = random_matrix(B, 4, 6);
  Mat dw = random_matrix(4, 6, 7);  // gradients are added to what is there
  Mat db = random_matrix(1, 4, 8);
  const Mat dw0 = dw, db0 = db;
  pkm::linear_backward_weights<double>(x, dy, dw, db.data());
  Mat want_dw = dw0, want_db = db0;
  for (Index o = 0; o < 4; ++o) {
    for (Index r = 0; r < B; ++r) {
      want_db(0, o) += dy(r, o);
      for (Index i = 0; i < 6; ++i) want_dw(o, i) += dy(r, o) * x(r, i);
    }
  }
  CHECK((dw - want_dw).cwiseAbs().maxCoeff() < 1e-12);
  CHECK((db - want_db).cwiseAbs().maxCoeff() < 1e-12);
  Mat dx = Mat::Constant(B, 6, std::nan(""));
  pkm::linear_backward_input<double>(dy, w, dx, false);
  Mat want_dx = Mat::Zero(B, 6);
  for (Index r = 0; r < B; ++r)
    for (Index i = 0; i < 6; ++i)
      for (Index o = 0; o < 4; ++o) want_dx(r, i) += dy(r, o) * w(o, i);
  CHECK((dx - want_dx).cwiseAbs().maxCoeff() < 1e-12);
  pkm::linear_backward_input<double>(dy, w, dx, true);  // accumulate: twice the product
  CHECK((dx - 2 * want_dx).cwiseAbs().maxCoeff() < 1e-12);
}
