// Hostile and broken input to the layer and the optimizers: inconsistent sparse gradients,
// step counters at their limit, a fused backward that must refuse what step() refuses,
// overflowing scores, a cache left by a forward that threw, non-finite tables and parameters,
// and pkm called from inside the caller's own OpenMP threads. (Files and sizes:
// test_hostile_files.cpp.)
#include <catch2/catch.hpp>

#include <csignal>
#include <cstdint>
#include <cstdio>
#include <dirent.h>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <omp.h>

#include <pkm/io/checkpoint.hpp>
#include <pkm/io/optimizer_state.hpp>
#include <pkm/io/parity.hpp>
#include <pkm/pkm.hpp>

#include "files.hpp"
#include "support.hpp"

#ifndef PKM_TEST_DATA
#error "PKM_TEST_DATA must name tests/data"
#endif

using Catch::Contains;
using pkm::Index;
using pkm::io::SafetensorsFile;
using pkmtest::kInf;
using pkmtest::kNaN;
using pkmtest::Mat;
using pkmtest::same_bits;
using pkmtest::state_bytes;
using pkmtest::state_file;
using MatF = pkm::RowMatrix<float>;

namespace {

using pkmtest::raw_file;

pkm::SparseRowGrad<double> sparse(Index dim, std::vector<std::int64_t> rows, Index value_rows) {
  pkm::SparseRowGrad<double> g;
  g.dim = dim;
  g.rows = std::move(rows);
  g.values = Mat::Constant(value_rows, dim, 0.5);
  return g;
}

}  // namespace

// ---- refused before anything changes ----------------------------------------------------

TEST_CASE("inconsistent sparse gradients are refused where they enter", "[reliability][sparse]") {
  const auto good = sparse(3, {1, 4}, 2);
  const std::vector<std::pair<const char*, pkm::SparseRowGrad<double>>> bad = {
      {"values of 1 x 3 for 2 row ids", sparse(3, {1, 4}, 1)},
      {"values of 5 x 3 for 2 row ids", sparse(3, {1, 4}, 5)},
      {"not sorted and unique", sparse(3, {4, 1}, 2)},
      {"not sorted and unique", sparse(3, {4, 4}, 2)},
      {"row id -1", sparse(3, {-1, 4}, 2)}};
  for (const auto& [what, g] : bad) {
    INFO(what);
    auto target = good;
    CHECK_THROWS_WITH(target.merge(g), Contains(what));
    CHECK(target.rows == good.rows);
    CHECK(same_bits(target.values, good.values));
    auto self = g;
    CHECK_THROWS_WITH(self.merge(good), Contains(what));
    Mat dense = Mat::Zero(8, 3);
    CHECK_THROWS_WITH(g.add_to(dense), Contains(what));
    CHECK(dense.isZero());
  }
  Mat small = Mat::Zero(4, 3);
  CHECK_THROWS_AS(good.add_to(small), std::out_of_range);  // row 4 of a 4-row table

  // Into backward: refused before any gradient is written.
  const auto c = pkmtest::small_config();
  pkm::MemoryLayer<double> layer(c, 3);
  const Mat x = pkmtest::random_matrix(4, c.input_dim, 4);
  pkm::ForwardCache<double> cache;
  const Mat out = layer.forward(x, cache);
  pkm::LayerGradients<double> grads(c);
  grads.values = sparse(c.v_dim, {7, 2}, 2);
  CHECK_THROWS_WITH(layer.backward(x, cache, out, grads),
                    Contains("dvalues") && Contains("not sorted"));
  grads.values = sparse(c.v_dim, {2, c.slots()}, 2);
  CHECK_THROWS_AS(layer.backward(x, cache, out, grads), std::out_of_range);
  bool untouched = true;
  std::as_const(grads.params).for_each([&](pkm::Tensor, pkm::ConstMatrixMap<double> m) {
    untouched = untouched && m.isZero();
  });
  CHECK(untouched);
}

TEST_CASE("a step counter at its maximum refuses the next step and changes nothing",
          "[reliability][optim]") {
  const Index rows = 16, dim = 4;
  pkm::ValueTable<double> table(rows, dim);
  table.matrix() = pkmtest::random_matrix(rows, dim, 5);
  const Mat before = table.matrix();
  const auto g = sparse(dim, {2, 9}, 2);
  constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();
  pkm::optim::LazyAdam<double> adam(table);
  pkm::io::load_optimizer_state(state_file(adam,
                                           [&](const std::string& n, auto* d, std::size_t) {
                                             if (n == "step") d[0] = kMax;
                                           }),
                                adam, "");
  CHECK(adam.steps() == kMax);
  CHECK_THROWS_WITH(adam.step(table, g), Contains("at its maximum"));
  pkm::optim::RowWiseAdagrad<double> ada(table);
  pkm::io::load_optimizer_state(state_file(ada,
                                           [&](const std::string& n, auto* d, std::size_t) {
                                             if (n == "step") d[0] = kMax;
                                           }),
                                ada, "");
  CHECK_THROWS_WITH(ada.step(table, g), Contains("at its maximum"));
  CHECK(same_bits(Mat(table.matrix()), before));
  CHECK(adam.steps() == kMax);

  Mat p = Mat::Ones(2, 2), dp = Mat::Ones(2, 2);
  pkm::optim::AdamW<double> dense;
  dense.add("w", p, dp);
  pkm::io::load_optimizer_state(state_file(dense,
                                           [&](const std::string& n, auto* d, std::size_t) {
                                             if (n == "step") d[0] = kMax;
                                           }),
                                dense, "");
  CHECK_THROWS_WITH(dense.step(), Contains("at its maximum"));
  CHECK(p.isOnes());
}

// ---- silent wrong results ---------------------------------------------------------------

TEST_CASE("the fused backward refuses what backward + step() refuses, changing nothing",
          "[reliability][optim]") {
  pkm::optim::AdamOptions no_clip;
  no_clip.lr = 0.1;
  no_clip.max_grad_norm = 0.0;
  SECTION("the read's gradient overflows in the output op (finite dout)") {
    const auto c = pkmtest::medium_config();
    pkm::MemoryLayer<float> layer(c, 7);
    layer.params().value_proj_weight().setOnes();
    const MatF x = pkmtest::random_matrix(32, c.input_dim, 8).cast<float>();
    pkm::ForwardCache<float> cache;
    layer.forward(x, cache);
    const MatF dout = MatF::Constant(32, c.output_dim, 1e38f);
    // Unfused: the gradient holds infinities and step() refuses it.
    pkm::LayerGradients<float> grads(c);
    layer.backward(x, cache, dout, grads);
    pkm::optim::LazyAdam<float> step_opt(layer.values(), no_clip);
    CHECK_THROWS_WITH(step_opt.step(layer.values(), grads.values), Contains("not finite"));
    // Fused: refused too, and the table, dparams, dx and the optimizer are untouched.
    const MatF table_before = layer.values().matrix();
    pkm::optim::LazyAdam<float> opt(layer.values(), no_clip);
    pkm::LayerParameters<float> dparams(c);
    MatF dx = MatF::Constant(32, c.input_dim, 7.0f);
    CHECK_THROWS_WITH(
        layer.backward_fused(x, cache, dout, dparams, opt, dx),
        Contains("gradient of the read") && Contains("dout") && Contains("nothing was updated"));
    CHECK(same_bits(MatF(layer.values().matrix()), table_before));
    bool zero = true;
    std::as_const(dparams).for_each(
        [&](pkm::Tensor, pkm::ConstMatrixMap<float> m) { zero = zero && m.isZero(); });
    CHECK(zero);
    CHECK((dx.array() == 7.0f).all());
    CHECK(opt.steps() == 0);
  }
  SECTION("each token's gradient is finite but a row's sum over tokens overflows") {
    auto c = pkmtest::medium_config();
    c.memory_plus = false;
    c.value_projection = false;
    c.output_dim = c.v_dim;
    pkm::MemoryLayer<float> layer(c, 9);
    const MatF one = pkmtest::random_matrix(1, c.input_dim, 10).cast<float>();
    const MatF x = one.replicate(64, 1);  // every token reads the same rows
    pkm::ForwardCache<float> cache;
    layer.forward(x, cache);
    const MatF dout = MatF::Constant(64, c.output_dim, 3e38f);
    const MatF table_before = layer.values().matrix();
    for (bool adagrad : {false, true}) {
      pkm::LayerParameters<float> dparams(c);
      std::string error;
      try {
        if (adagrad) {
          pkm::optim::RowWiseAdagrad<float> opt(layer.values());
          layer.backward_fused(x, cache, dout, dparams, opt);
        } else {
          pkm::optim::LazyAdam<float> opt(layer.values(), no_clip);
          layer.backward_fused(x, cache, dout, dparams, opt);
        }
      } catch (const std::runtime_error& e) {
        error = e.what();
      }
      CHECK_THAT(error, Contains("not finite") && Contains("nothing was updated"));
      CHECK(same_bits(MatF(layer.values().matrix()), table_before));
      bool zero = true;
      std::as_const(dparams).for_each(
          [&](pkm::Tensor, pkm::ConstMatrixMap<float> m) { zero = zero && m.isZero(); });
      CHECK(zero);
    }
  }
}

TEST_CASE("overflowing scores and queries are reported as overflow", "[reliability][layer]") {
  const auto c = pkmtest::small_config();  // half = 2
  const MatF x = pkmtest::random_matrix(3, c.input_dim, 11).cast<float>();
  pkm::ForwardCache<float> cache;
  MatF out(3, c.output_dim);
  {
    pkm::MemoryLayer<float> layer(c, 12);
    layer.params().query_weight().setZero();
    layer.params().query_bias().setConstant(1e19f);
    layer.params().keys().setConstant(
        1e19f);  // each half score 2e38 (finite), their sum 4e38 (inf)
    CHECK_THROWS_WITH(layer.forward(x, out, cache),
                      Contains("sum of two finite half scores") && Contains("overflows"));
  }
  {
    pkm::MemoryLayer<float> layer(c, 12);
    layer.params().query_weight().setConstant(1e38f);  // finite weights, q = Wq x overflows
    const MatF big = MatF::Constant(3, c.input_dim, 10.0f);
    CHECK_THROWS_WITH(layer.forward(big, out, cache),
                      Contains("the query (q = Wq x + bq) is not finite"));
  }
  {
    pkm::MemoryLayer<float> layer(c, 12);
    layer.params().query_weight().setZero();
    layer.params().query_bias().setConstant(1e20f);
    layer.params().keys().setConstant(1e20f);  // a half score of 2e40
    CHECK_THROWS_WITH(layer.forward(x, out, cache),
                      Contains("a half score overflows") && Contains("finite but too large"));
  }
  pkm::MemoryConfig q = c;
  q.qk_norm = true;
  q.qk_norm_scale = 1e300;  // a finite double, inf as a float
  CHECK_THROWS_WITH(q.validate(), Contains("qk_norm_scale") && Contains("as a float"));
  q.qk_norm_scale = 1e-300;  // zero as a float
  CHECK_THROWS_AS(q.validate(), std::invalid_argument);
}

TEST_CASE("a cache from a forward that threw is refused by backward", "[reliability][layer]") {
  const auto c = pkmtest::small_config();
  pkm::MemoryLayer<float> layer(c, 13);
  const MatF x = pkmtest::random_matrix(4, c.input_dim, 14).cast<float>();
  pkm::ForwardCache<float> cache;
  const MatF out = layer.forward(x, cache);
  pkm::LayerGradients<float> grads(c);
  REQUIRE_NOTHROW(layer.backward(x, cache, out, grads));
  // The same layer, made to throw in the middle of the key search.
  pkm::MemoryLayer<float> broken = layer;
  broken.params().query_weight().setZero();
  broken.params().query_bias().setConstant(1e19f);
  broken.params().keys().setConstant(1e19f);
  CHECK_THROWS_AS(broken.forward(x, cache), std::runtime_error);
  CHECK_THROWS_WITH(layer.backward(x, cache, out, grads), Contains("completed forward"));
  CHECK_THROWS_WITH(broken.backward(x, cache, out, grads), Contains("completed forward"));
  // A forward that throws at its argument checks leaves a valid cache valid.
  layer.forward(x, cache);
  CHECK_THROWS_AS(layer.forward(MatF(4, c.input_dim + 1), cache), std::invalid_argument);
  CHECK_NOTHROW(layer.backward(x, cache, out, grads));
  // Unfilled again by a forward that throws, then filled by one that completes.
  CHECK_THROWS_AS(broken.forward(x, cache), std::runtime_error);
  CHECK_THROWS_AS(layer.backward(x, cache, out, grads), std::invalid_argument);
  layer.forward(x, cache);
  CHECK_NOTHROW(layer.backward(x, cache, out, grads));
}

TEST_CASE(
    "NaN or infinity in the value table or the dense parameters never reaches the output silently",
    "[reliability][layer]") {
  auto c = pkmtest::medium_config();
  c.gating = true;
  const MatF x = pkmtest::random_matrix(8, c.input_dim, 15).cast<float>();
  pkm::ForwardCache<float> cache;
  MatF out(8, c.output_dim);
  SECTION("a table row a token reads") {
    pkm::MemoryLayer<float> layer(c, 16);
    layer.forward(x, out, cache);
    const Index r = cache.indices(5, 3);
    layer.values().row(r)[2] = kNaN;
    CHECK_THROWS_WITH(
        layer.forward(x, out, cache),
        Contains("value table row " + std::to_string(r)) && Contains("read by token"));
    CHECK(pkm::first_non_finite_row(layer.values()) == r);
    pkm::LayerGradients<float> grads(c);
    CHECK_THROWS_WITH(layer.backward(x, cache, out, grads), Contains("completed forward"));
  }
  SECTION("a row no token reads: forward is fine, the checker finds it") {
    pkm::MemoryLayer<float> layer(c, 16);
    layer.forward(x, out, cache);
    std::vector<bool> read(static_cast<std::size_t>(c.slots()), false);
    for (Index i = 0; i < cache.indices.size(); ++i)
      read[static_cast<std::size_t>(cache.indices.data()[i])] = true;
    Index unread = 0;
    while (read[static_cast<std::size_t>(unread)]) ++unread;
    CHECK(pkm::first_non_finite_row(layer.values()) == -1);
    layer.values().row(unread)[0] = -kInf;
    CHECK_NOTHROW(layer.forward(x, out, cache));
    CHECK(pkm::first_non_finite_row(layer.values()) == unread);
  }
  SECTION("a 16-bit table") {
    pkm::MemoryLayer<float, pkm::bf16> layer(c, 17);
    layer.forward(x, out, cache);
    const Index r = cache.indices(0, 0);
    layer.values().row(r)[1] = pkm::bf16(kInf);
    CHECK_THROWS_WITH(layer.forward(x, out, cache),
                      Contains("value table row " + std::to_string(r)));
    CHECK(pkm::first_non_finite_row(layer.values()) == r);
  }
  SECTION("each dense parameter") {
    for (pkm::Tensor t :
         {pkm::Tensor::swilu_weight, pkm::Tensor::swilu_bias, pkm::Tensor::value_proj_weight,
          pkm::Tensor::value_proj_bias, pkm::Tensor::gate_weight, pkm::Tensor::gate_bias,
          pkm::Tensor::query_weight, pkm::Tensor::keys}) {
      pkm::MemoryLayer<float> layer(c, 18);
      layer.params().vector(t)[0] = kNaN;
      out.setConstant(5.0f);
      CHECK_THROWS_WITH(
          layer.forward(x, out, cache),
          Contains(std::string("parameter '") + pkm::tensor_name(t) + "' holds nan at element 0"));
      CHECK((out.array() == 5.0f).all());  // refused before anything was written
    }
  }
  SECTION("a checkpoint holding NaN is refused on load") {
    pkm::MemoryLayer<float> layer(c, 19);
    layer.values().row(11)[0] = kNaN;
    pkm::io::SafetensorsWriter w;
    pkm::io::add_layer(w, layer);
    const auto f = SafetensorsFile::from_bytes(w.to_bytes(), "nan.safetensors");
    CHECK_THROWS_WITH(pkm::io::load_layer<float>(f),
                      Contains("values.weight") && Contains("row 11"));
    pkm::MemoryLayer<float> dense_nan(c, 19);
    dense_nan.params().swilu_weight()(0, 1) = kInf;
    pkm::io::SafetensorsWriter w2;
    pkm::io::add_layer(w2, dense_nan);
    CHECK_THROWS_WITH(
        pkm::io::load_layer<float>(SafetensorsFile::from_bytes(w2.to_bytes(), "inf.safetensors")),
        Contains("swilu_projection.weight"));
  }
}

TEST_CASE("the same bits when called from inside the caller's OpenMP threads",
          "[reliability][threads]") {
  auto c = pkmtest::medium_config();
  c.input_dim = 300;  // products of several GEMM tiles
  c.v_dim = 280;
  c.output_dim = 260;
  const pkm::MemoryLayer<float> layer(c, 20);
  const MatF x = pkmtest::random_matrix(600, c.input_dim, 21).cast<float>();
  const MatF dout = pkmtest::random_matrix(600, c.output_dim, 22).cast<float>();
  struct Result {
    MatF out, dx;
    pkm::LayerGradients<float> grads;
  };
  auto run = [&](Result& r) {
    pkm::ForwardCache<float> cache;
    r.out = layer.forward(x, cache);
    r.grads = pkm::LayerGradients<float>(c);
    r.dx.resize(x.rows(), x.cols());
    layer.backward(x, cache, dout, r.grads, r.dx);
  };
  Result ref;
  run(ref);
  auto compare = [&](const std::vector<Result>& rs) {
    for (const auto& r : rs) {
      CHECK(same_bits(r.out, ref.out));
      CHECK(same_bits(r.dx, ref.dx));
      CHECK(pkmtest::first_gradient_difference(r.grads, ref.grads).empty());
    }
  };
  std::vector<Result> rs(4);
  SECTION("a parallel for with the default nesting") {
#pragma omp parallel for num_threads(2)
    for (int i = 0; i < 4; ++i) run(rs[static_cast<std::size_t>(i)]);
    compare(rs);
  }
  SECTION("nested parallelism enabled") {
    const int levels = omp_get_max_active_levels();
    omp_set_max_active_levels(4);
#pragma omp parallel for num_threads(2)
    for (int i = 0; i < 4; ++i) run(rs[static_cast<std::size_t>(i)]);
    omp_set_max_active_levels(levels);
    compare(rs);
  }
  SECTION("a team of one") {
#pragma omp parallel num_threads(1)
    run(rs[0]);
    rs.resize(1);
    compare(rs);
  }
}

TEMPLATE_TEST_CASE("all_finite finds NaN and infinities at every kind of position", "[reliability]",
                   float, double) {
  using L = std::numeric_limits<TestType>;
  CHECK(pkm::detail::all_finite<TestType>(nullptr, 0));
  for (std::int64_t n : {1, 7, 16, 1023, 1024, 1025, 3000}) {
    std::vector<TestType> v(static_cast<std::size_t>(n), TestType(1.5));
    v[0] = L::max();
    v[static_cast<std::size_t>(n - 1)] = -L::denorm_min();
    CHECK(pkm::detail::all_finite(v.data(), n));
    for (std::int64_t pos : {std::int64_t(0), n / 2, n - 1}) {
      for (TestType bad : {L::quiet_NaN(), -L::quiet_NaN(), L::infinity(), -L::infinity()}) {
        const TestType keep = v[static_cast<std::size_t>(pos)];
        v[static_cast<std::size_t>(pos)] = bad;
        CHECK_FALSE(pkm::detail::all_finite(v.data(), n));
        v[static_cast<std::size_t>(pos)] = keep;
      }
    }
  }
}
