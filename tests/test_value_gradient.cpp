// pkm/value_gradient.hpp and pkm/row_accumulator.hpp: the value-gradient sinks, the
// extension point of every backward. A layer's backward_to with a sink of the caller's own
// gives what backward gives; a sink's check refuses before anything is written; the
// accumulator sums backwards as merging their SparseRowGrads does, and steps as a step of it.
#include <catch2/catch.hpp>

#include <omp.h>

#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <pkm/pkm.hpp>

#include "support.hpp"

using pkm::Index;
using MatF = pkm::RowMatrix<float>;

namespace {
/// A sink whose check refuses everything.
struct Refusing {
  void check(const char* who, Index, Index) const {
    throw std::invalid_argument(std::string(who) + ": refused");
  }
  template <class R>
  void operator()(const std::vector<std::int64_t>&, Index, R&&) {
    FAIL("a refused sink was called");
  }
};
}  // namespace

TEST_CASE("a layer's backward into a sink of the caller's equals backward into a SparseRowGrad",
          "[value_gradient]") {
  const auto c = pkmtest::medium_config();
  const pkm::MemoryLayer<float> layer(c, 17);
  const MatF x = pkmtest::random_matrix(70, c.input_dim, 1).cast<float>();
  const MatF dout = pkmtest::random_matrix(70, c.output_dim, 2).cast<float>();
  pkm::ForwardCache<float> cache;
  layer.forward(x, cache);
  pkm::LayerGradients<float> ref(c);
  ref.zero();
  MatF dx_ref(70, c.input_dim);
  layer.backward(x, cache, dout, ref, dx_ref);

  // A dense gradient the caller owns, filled through reduce_rows_into.
  MatF dense = MatF::Zero(c.slots(), c.v_dim);
  pkm::LayerParameters<float> dp(c);
  dp.set_zero();
  MatF dx(70, c.input_dim);
  int calls = 0;
  layer.backward_to(
      x, cache, dout, dp,
      [&](const std::vector<std::int64_t>& rows, Index dim, auto&& reduce) {
        ++calls;
        CHECK(dim == c.v_dim);
        pkm::reduce_rows_into(rows, reduce,
                              [&](Index u) { return dense.row(rows[std::size_t(u)]).data(); });
      },
      dx);
  CHECK(calls == 1);
  CHECK(pkmtest::same_bits(dx, dx_ref));
  dp.for_each([&](pkm::Tensor t, pkm::MatrixMap<float> m) {
    CHECK(pkmtest::same_bits(m, ref.params.matrix(t)));
  });
  for (std::size_t u = 0; u < ref.values.rows.size(); ++u) {
    CHECK(pkmtest::same_bits(dense.row(ref.values.rows[u]), ref.values.values.row(Index(u))));
  }
  MatF untouched = dense;
  for (auto r : ref.values.rows) untouched.row(r).setZero();
  CHECK(untouched.cwiseAbs().maxCoeff() == 0.0f);

  // A sink whose check refuses: nothing written, dparams and dx included.
  pkm::LayerParameters<float> dp2(c);
  dp2.set_zero();
  MatF dx2 = MatF::Constant(70, c.input_dim, 7.0f);
  CHECK_THROWS_WITH(layer.backward_to(x, cache, dout, dp2, Refusing{}, dx2),
                    Catch::Contains("refused"));
  dp2.for_each(
      [&](pkm::Tensor, pkm::MatrixMap<float> m) { CHECK(m.cwiseAbs().maxCoeff() == 0.0f); });
  CHECK((dx2.array() == 7.0f).all());

  // The accumulator as a sink: two backwards, the merged gradient.
  pkm::RowAccumulator<float> acc(c.slots(), c.v_dim);
  pkm::SparseRowGrad<float> twice;
  for (int k = 0; k < 2; ++k) {
    pkm::LayerParameters<float> dpk(c);
    dpk.set_zero();
    layer.backward_to(x, cache, dout, dpk, acc);
    twice.merge(ref.values);
  }
  const auto got = acc.gradient();
  CHECK(got.rows == twice.rows);
  CHECK(pkmtest::same_bits(got.values, twice.values));
  pkm::RowAccumulator<float> wrong(c.slots() + 1, c.v_dim);
  CHECK_THROWS_WITH(layer.backward_to(x, cache, dout, dp2, wrong),
                    Catch::Contains("accumulator is for a table of"));
}

TEST_CASE("RowAccumulator sums backwards' rows as merging their sparse gradients does",
          "[optim][accumulate]") {
  // Three gradients with overlapping rows, added in order, against SparseRowGrad::merge (the
  // plain reference: union of sorted rows, sums in the same order).
  const Index rows = 300, dim = 37;
  std::mt19937_64 rng(5);
  auto gradient = [&](int k) {  // rows k, k + 2 + k, ...: overlapping between the three
    pkm::SparseRowGrad<float> g;
    g.dim = dim;
    for (std::int64_t r = k; r < rows; r += 2 + k) g.rows.push_back(r);
    g.values = pkmtest::random_matrix(Index(g.rows.size()), dim, 40 + k).cast<float>();
    return g;
  };
  pkm::SparseRowGrad<float> merged;
  pkm::RowAccumulator<float> acc(rows, dim);
  CHECK(acc.empty());
  for (int k = 0; k < 3; ++k) {
    merged.merge(gradient(k));
    acc.add(gradient(k));
  }
  const pkm::SparseRowGrad<float> got = acc.gradient();
  CHECK(got.rows == merged.rows);
  CHECK(acc.touched() == merged.size());
  CHECK(pkmtest::same_bits(got.values, merged.values));
  // The same bits with 1 and 2 threads.
  omp_set_num_threads(1);
  pkm::RowAccumulator<float> one(rows, dim);
  for (int k = 0; k < 3; ++k) one.add(gradient(k));
  omp_set_num_threads(2);
  CHECK(pkmtest::same_bits(one.gradient().values, got.values));
  // A step from the accumulator equals a step from the merged gradient, bit for bit.
  {
    pkm::ValueTable<float> a(rows, dim), b(rows, dim);
    pkm::optim::RowWiseAdagradOptions o;
    o.max_grad_norm = 0.5;
    pkm::optim::RowWiseAdagrad<float> oa(rows, dim, o), ob(rows, dim, o);
    const double na = acc.step(oa, a), nb = ob.step(b, merged);
    CHECK(na == nb);
    CHECK(pkmtest::same_bits(a.matrix(), b.matrix()));
  }
  // Bad rows change nothing; clear forgets everything.
  CHECK_THROWS_AS(acc.add_rows({3, rows}, [](Index, float*) {}), std::out_of_range);
  CHECK_THROWS_WITH(acc.add_rows({3, 3}, [](Index, float*) {}), Catch::Contains("appears twice"));
  CHECK(pkmtest::same_bits(acc.gradient().values, merged.values));
  acc.clear();
  CHECK(acc.empty());
  CHECK(acc.gradient().size() == 0);
  CHECK_THROWS_AS(pkm::RowAccumulator<float>(0, 3), std::invalid_argument);
}
