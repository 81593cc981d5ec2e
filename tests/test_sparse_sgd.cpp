// pkm/optim/sparse_sgd.hpp: plain sparse SGD against its rule, by hand.
#include <catch2/catch.hpp>

#include <vector>

#include <pkm/pkm.hpp>

#include "support.hpp"

using pkm::Index;
using MatF = pkm::RowMatrix<float>;
using pkmtest::same_bits;
using pkmtest::state_of;

TEST_CASE("plain SGD for values follows its rule, clipping and decay on the updated rows only",
          "[sparse_sgd][optim]") {
  pkm::ValueTable<float> t(5, 3);
  for (Index i = 0; i < 15; ++i) t.matrix().data()[i] = 0.1f * float(i);
  const MatF before = t.matrix();
  pkm::optim::SgdOptions o;
  o.lr = 0.5;
  o.weight_decay = 0.1;
  o.max_grad_norm = 1.0;
  pkm::optim::SparseSgd<float> sgd(t, o);
  pkm::SparseRowGrad<float> g;
  g.dim = 3;
  g.rows = {1, 3};
  g.values.resize(2, 3);
  g.values << 3, 0, 0, 0, 4, 0;  // norm 5: clipped by 1/5
  const double norm = sgd.step(t, g);
  CHECK(norm == Approx(5.0));
  for (Index r = 0; r < 5; ++r) {
    for (Index d = 0; d < 3; ++d) {
      float expect = before(r, d);
      if (r == 1 || r == 3) {
        const float gd = float(1.0 / 5.0) * g.values(r == 1 ? 0 : 1, d);
        expect = before(r, d) - 0.5f * (gd + 0.1f * before(r, d));
      }
      CHECK(t.matrix()(r, d) == Approx(expect).margin(1e-6));
    }
  }
  CHECK(sgd.steps() == 1);
  CHECK_THROWS_AS(pkm::optim::SparseSgd<float>(t, pkm::optim::SgdOptions{-1.0}),
                  std::invalid_argument);
}
