#include <catch2/catch.hpp>

#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include <omp.h>

#include <pkm/pkm.hpp>

#include "support.hpp"

using pkm::Index;
using pkmtest::Mat;
using MatF = pkm::RowMatrix<float>;
using Catch::Contains;

using pkmtest::medium_config;
using pkmtest::same_bits;

TEST_CASE("forward matches the plain-loop reference in every output mode", "[layer]") {
  int seed = 0;
  for (int mode = 0; mode < 3; ++mode) {
    for (bool gate : {false, true}) {
      for (bool qk : {false, true}) {
        for (bool bias : {false, true}) {
          auto c = medium_config();
          c.memory_plus = mode == 0;
          c.value_projection = mode != 2;
          if (mode == 2) c.output_dim = c.v_dim;
          c.gating = gate;
          c.qk_norm = qk;
          c.query_bias = bias;
          pkm::MemoryLayer<double> layer(c, ++seed);
          if (bias) layer.params().query_bias().setRandom();  // zero after init: make it count
          const Mat x = pkmtest::random_matrix(150, c.input_dim, seed);
          pkm::ForwardCache<double> cache;
          const Mat out = layer.forward(x, cache);
          const auto ref = pkmtest::reference_forward(c, layer.params(), layer.values(), x);
          INFO("mode " << mode << " gate " << gate << " qk " << qk << " bias " << bias);
          REQUIRE(cache.indices == ref.indices);
          CHECK((out - ref.out).cwiseAbs().maxCoeff() < 1e-10);
        }
      }
    }
  }
}

TEST_CASE("the float layer agrees with the double reference", "[layer]") {
  auto c = medium_config();
  c.gating = true;
  pkm::MemoryLayer<float> layer(c, 9);
  const Mat x = pkmtest::random_matrix(64, c.input_dim, 10);
  const MatF xf = x.cast<float>();
  pkm::ForwardCache<float> cache;
  const MatF out = layer.forward(xf, cache);
  const auto ref = pkmtest::reference_forward(c, layer.params(), layer.values(), xf.cast<double>());
  // Selections may differ only where two scores are within float rounding of each other.
  const double agree =
      double((cache.indices.array() == ref.indices.array()).count()) / double(ref.indices.size());
  CHECK(agree > 0.99);
  Index rows_checked = 0;
  for (Index b = 0; b < x.rows(); ++b) {
    if (cache.indices.row(b) != ref.indices.row(b)) continue;
    ++rows_checked;
    CHECK((out.row(b).cast<double>() - ref.out.row(b)).cwiseAbs().maxCoeff() < 1e-4);
  }
  CHECK(rows_checked > 50);
}

TEST_CASE("initialisation is reproducible from the seed and follows the reference scales",
          "[layer][init]") {
  auto c = medium_config();
  c.gating = true;
  pkm::MemoryLayer<float> a(c, 123), b(c, 123), d(c, 124);
  bool all_same = true, any_diff = false;
  for (int t = 0; t < pkm::kNumTensors; ++t) {
    if (!a.params().has(pkm::Tensor(t))) continue;
    const MatF ma = a.params().matrix(pkm::Tensor(t)), mb = b.params().matrix(pkm::Tensor(t)),
               md = d.params().matrix(pkm::Tensor(t));
    all_same = all_same && same_bits(ma, mb);
    any_diff = any_diff || !same_bits(ma, md);
  }
  CHECK(all_same);
  CHECK(any_diff);
  CHECK(std::memcmp(a.values().data(), b.values().data(), sizeof(float) * c.slots() * c.v_dim) ==
        0);
  // Scales: keys U(+-1/sqrt(k_dim)), values N(0, 1/sqrt(v_dim)), biases zero.
  const double kb = 1.0 / std::sqrt(double(c.k_dim));
  CHECK(a.params().keys().cwiseAbs().maxCoeff() <= kb);
  CHECK(a.params().keys().cwiseAbs().maxCoeff() > 0.9 * kb);
  const auto V = a.values().matrix().cast<double>();
  const double sd = std::sqrt((V.array() - V.mean()).square().mean());
  CHECK(sd == Approx(1.0 / std::sqrt(double(c.v_dim))).epsilon(0.02));
  CHECK(a.params().query_bias().isZero());
  const double xavier = std::sqrt(6.0 / double(c.input_dim + c.heads * c.k_dim));
  CHECK(a.params().query_weight().cwiseAbs().maxCoeff() <= xavier);
}

TEST_CASE("parameters and tables can view the caller's buffers without copying", "[layer][views]") {
  auto c = pkmtest::small_config();
  c.gating = true;
  pkm::LayerParameters<double> owned(c);
  pkm::init_parameters(owned, 77);
  // The caller's own storage, one std::vector per tensor.
  std::vector<std::vector<double>> store(pkm::kNumTensors);
  pkm::ParameterBuffers<double> buf;
  double** slots[] = {
      &buf.keys,       &buf.query_weight,      &buf.query_bias,      &buf.swilu_weight,
      &buf.swilu_bias, &buf.value_proj_weight, &buf.value_proj_bias, &buf.gate_weight,
      &buf.gate_bias};
  for (int t = 0; t < pkm::kNumTensors; ++t) {
    const auto m = owned.matrix(pkm::Tensor(t));
    store[t].assign(m.data(), m.data() + m.size());
    *slots[t] = store[t].data();
  }
  Mat table = pkmtest::random_matrix(c.slots(), c.v_dim, 8);
  pkm::MemoryLayer<double> viewing(pkm::LayerParameters<double>::view(c, buf),
                                   pkm::ValueTable<double>::view(table));
  CHECK(viewing.params().keys().data() == store[0].data());
  CHECK(viewing.values().data() == table.data());
  CHECK_FALSE(viewing.params().owns_storage());
  CHECK_FALSE(viewing.values().owns_storage());

  pkm::ValueTable<double> own_table(c.slots(), c.v_dim);
  own_table.matrix() = table;
  pkm::MemoryLayer<double> owning(owned, std::move(own_table));
  const Mat x = pkmtest::random_matrix(5, c.input_dim, 3);
  pkm::ForwardCache<double> c1, c2;
  CHECK(same_bits(viewing.forward(x, c1), owning.forward(x, c2)));
  // Writing through the caller's buffer changes what the layer computes.
  store[0][0] += 0.5;
  table(c1.indices(0, 0), 0) += 1.0;
  const Mat changed = viewing.forward(x, c1);
  CHECK_FALSE(same_bits(changed, owning.forward(x, c2)));

  // A copy of an owning set is deep; a copy of a view is a view.
  pkm::LayerParameters<double> copy = owned;
  CHECK(copy.keys().data() != owned.keys().data());
  CHECK(copy.keys() == owned.keys());
  pkm::LayerParameters<double> view_copy = viewing.params();
  CHECK(view_copy.keys().data() == store[0].data());

  // Views with missing or extra buffers are refused.
  auto missing = buf;
  missing.gate_bias = nullptr;
  CHECK_THROWS_WITH(pkm::LayerParameters<double>::view(c, missing), Contains("gating.bias"));
  auto extra = buf;
  auto c_nogate = c;
  c_nogate.gating = false;
  CHECK_THROWS_WITH(pkm::LayerParameters<double>::view(c_nogate, extra), Contains("gating.weight"));
}

TEST_CASE("bad input gives a clear error and leaves parameters unchanged", "[layer][errors]") {
  auto c = pkmtest::small_config();
  pkm::MemoryLayer<float> layer(c, 5);
  const pkm::LayerParameters<float> before = layer.params();
  const MatF x = pkmtest::random_matrix(4, c.input_dim, 1).cast<float>();
  pkm::ForwardCache<float> cache;

  SECTION("wrong input width") {
    const MatF wide = MatF::Zero(4, c.input_dim + 1);
    CHECK_THROWS_WITH(layer.forward(wide, cache),
                      Contains("x has 7 columns") && Contains("input_dim = 6"));
  }
  SECTION("NaN or infinity in the input") {
    MatF bad = x;
    bad(2, 3) = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH(layer.forward(bad, cache), Contains("x(2, 3)") && Contains("not finite"));
    bad(2, 3) = std::numeric_limits<float>::infinity();
    CHECK_THROWS_AS(layer.forward(bad, cache), std::invalid_argument);
  }
  SECTION("NaN in the parameters is reported, not a crash") {
    pkm::MemoryLayer<float> broken = layer;
    broken.params().keys()(0, 0) = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_AS(broken.forward(x, cache), std::runtime_error);
    CHECK_THROWS_WITH(broken.forward(x, cache),
                      Contains("parameter 'keys' holds nan at element 0"));
  }
  SECTION("wrong output shape") {
    MatF out(4, c.output_dim + 2);
    CHECK_THROWS_WITH(layer.forward(x, out, cache), Contains("out is 4 x 9"));
  }
  SECTION("an empty batch is a valid no-op") {
    const MatF empty(0, c.input_dim);
    const MatF out = layer.forward(empty, cache);
    CHECK(out.rows() == 0);
    CHECK(out.cols() == c.output_dim);
    pkm::LayerGradients<float> g(c);
    MatF dx(0, c.input_dim);
    layer.backward(empty, cache, MatF(0, c.output_dim), g, dx);
    CHECK(g.values.empty());
    CHECK(g.params.keys().isZero());
  }
  SECTION("backward with mismatched arguments") {
    layer.forward(x, cache);
    pkm::LayerGradients<float> g(c);
    MatF dx(4, c.input_dim);
    const MatF dout = MatF::Ones(4, c.output_dim);
    CHECK_THROWS_WITH(layer.backward(x, cache, MatF::Ones(3, c.output_dim), g, dx),
                      Contains("dout is 3 x 7"));
    CHECK_THROWS_WITH(layer.backward(x.topRows(2), cache, dout, g, dx),
                      Contains("forward batch of 4"));
    MatF wrong_dx(4, 2);
    CHECK_THROWS_WITH(layer.backward(x, cache, dout, g, wrong_dx), Contains("dx is 4 x 2"));
    MatF nan_dout = dout;
    nan_dout(1, 1) = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH(layer.backward(x, cache, nan_dout, g, dx),
                      Contains("dout(1, 1) = nan is not finite"));
    auto c2 = c;
    c2.knn = 2;
    pkm::LayerGradients<float> g2(c2);
    CHECK_THROWS_WITH(layer.backward(x, cache, dout, g2, dx), Contains("different MemoryConfig"));
    pkm::ForwardCache<float> fresh;
    CHECK_THROWS_WITH(layer.backward(x, fresh, dout, g, dx), Contains("cache was not filled"));
    pkm::ForwardCache<float> corrupt = cache;
    corrupt.indices(0, 0) = c.slots();
    CHECK_THROWS_AS(layer.backward(x, corrupt, dout, g, dx), std::out_of_range);
    CHECK(g.params.keys().isZero());  // nothing was written by any failed call
    CHECK(g.values.empty());
  }
  SECTION("a value table of the wrong size") {
    CHECK_THROWS_WITH((pkm::MemoryLayer<float>(c, pkm::ValueTable<float>(24, c.v_dim), 1)),
                      Contains("value table is 24 x 5") && Contains("25 x 5"));
    CHECK_THROWS_AS((pkm::MemoryLayer<float>(c, pkm::ValueTable<float>(25, 4), 1)),
                    std::invalid_argument);
  }
  for (int t = 0; t < pkm::kNumTensors; ++t) {
    if (!before.has(pkm::Tensor(t))) continue;
    CHECK(layer.params().matrix(pkm::Tensor(t)) == before.matrix(pkm::Tensor(t)));
  }
}

TEST_CASE("outputs and gradients are bitwise equal with 1 and 2 threads", "[layer][threads]") {
  auto c = medium_config();
  c.gating = true;
  c.qk_norm = true;
  pkm::MemoryLayer<float> layer(c, 31);
  const MatF x = pkmtest::random_matrix(300, c.input_dim, 32).cast<float>();
  const MatF dout = pkmtest::random_matrix(300, c.output_dim, 33).cast<float>();
  struct Run {
    MatF out, dx;
    pkm::LayerGradients<float> g;
  };
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    Run r{MatF(), MatF(300, c.input_dim), pkm::LayerGradients<float>(c)};
    pkm::ForwardCache<float> cache;
    r.out = layer.forward(x, cache);
    layer.backward(x, cache, dout, r.g, r.dx);
    return r;
  };
  const int saved = omp_get_max_threads();
  const Run one = run(1), two = run(2);
  omp_set_num_threads(saved);
  CHECK(same_bits(one.out, two.out));
  CHECK(same_bits(one.dx, two.dx));
  CHECK(pkmtest::first_gradient_difference(one.g, two.g) == "");
}

TEST_CASE("forward on a const layer can run from several threads at once", "[layer][threads]") {
  auto c = medium_config();
  const pkm::MemoryLayer<float> layer(c, 41);
  std::vector<MatF> inputs, expected(4), got(4);
  for (int t = 0; t < 4; ++t) {
    inputs.push_back(pkmtest::random_matrix(50 + t, c.input_dim, 50 + t).cast<float>());
    pkm::ForwardCache<float> cache;
    expected[t] = layer.forward(inputs[t], cache);
  }
  std::vector<std::thread> pool;
  for (int t = 0; t < 4; ++t) {
    pool.emplace_back([&, t] {
      pkm::ForwardCache<float> cache;  // one cache per caller thread
      for (int rep = 0; rep < 3; ++rep) got[t] = layer.forward(inputs[t], cache);
    });
  }
  for (auto& th : pool) th.join();
  for (int t = 0; t < 4; ++t) CHECK(same_bits(got[t], expected[t]));
}

TEST_CASE("a reused cache gives the same result as a fresh one", "[layer]") {
  auto c = medium_config();
  c.memory_plus = false;
  pkm::MemoryLayer<float> layer(c, 3);
  pkm::ForwardCache<float> reused, fresh;
  const MatF big = pkmtest::random_matrix(130, c.input_dim, 1).cast<float>();
  const MatF small = pkmtest::random_matrix(7, c.input_dim, 2).cast<float>();
  layer.forward(big, reused);
  const MatF a = layer.forward(small, reused), b = layer.forward(small, fresh);
  CHECK(same_bits(a, b));
  CHECK(reused.batch == 7);
}

TEST_CASE("a cache whose backward buffers served a bigger batch gives a fresh cache's gradients",
          "[layer]") {
  // The backward keeps its temporaries (dq, the read's gradient, grouped contributions) in the
  // cache; nothing of a previous, larger call may leak into the next.
  auto c = medium_config();
  c.gating = true;
  c.qk_norm = true;
  pkm::MemoryLayer<float> layer(c, 5);
  const MatF big = pkmtest::random_matrix(130, c.input_dim, 1).cast<float>();
  const MatF small = pkmtest::random_matrix(9, c.input_dim, 2).cast<float>();
  const MatF dbig = pkmtest::random_matrix(130, c.output_dim, 3).cast<float>();
  const MatF dsmall = pkmtest::random_matrix(9, c.output_dim, 4).cast<float>();
  pkm::ForwardCache<float> reused, fresh;
  pkm::LayerGradients<float> g_big(c), g_reused(c), g_fresh(c);
  MatF dx_big(130, c.input_dim), dx_reused(9, c.input_dim), dx_fresh(9, c.input_dim);
  layer.forward(big, reused);
  layer.backward(big, reused, dbig, g_big, dx_big);
  layer.forward(small, reused);
  layer.backward(small, reused, dsmall, g_reused, dx_reused);
  layer.forward(small, fresh);
  layer.backward(small, fresh, dsmall, g_fresh, dx_fresh);
  CHECK(same_bits(dx_reused, dx_fresh));
  CHECK(pkmtest::first_gradient_difference(g_reused, g_fresh) == "");
}

TEST_CASE(
    "value initialisation: element values depend on their index alone and are standard normal",
    "[layer][init]") {
  const pkm::detail::CounterRng rng(5, pkm::kValueStream);
  // Any window of the stream equals the same window of one long fill, odd offsets included.
  std::vector<float> whole(1001);
  pkm::detail::fill_normal(rng, 0, 1001, 1.0f, whole.data());
  for (std::uint64_t first : {0, 1, 2, 3, 255, 256, 511, 513}) {
    for (Index n : {1, 2, 3, 300, 487}) {
      std::vector<float> part(std::size_t(n), 0.0f);
      pkm::detail::fill_normal(rng, first, n, 1.0f, part.data());
      INFO("first " << first << " n " << n);
      CHECK(std::memcmp(part.data(), whole.data() + first, sizeof(float) * std::size_t(n)) == 0);
    }
  }
  // The same table with 1 and 2 threads; moments of N(0, 1).
  pkm::ValueTable<float> a(4099, 33), b(4099, 33);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  pkm::init_values(a, 9);
  omp_set_num_threads(2);
  pkm::init_values(b, 9);
  omp_set_num_threads(saved);
  CHECK(std::memcmp(a.data(), b.data(), sizeof(float) * 4099 * 33) == 0);
  const Eigen::ArrayXd v =
      Eigen::Map<const Eigen::ArrayXf>(a.data(), 4099 * 33).cast<double>() * std::sqrt(33.0);
  const double mean = v.mean(), var = (v - mean).square().mean(),
               kurt = (v - mean).pow(4).mean() / (var * var);
  CHECK(std::abs(mean) < 0.02);
  CHECK(var == Approx(1.0).epsilon(0.02));
  CHECK(kurt == Approx(3.0).epsilon(0.05));
  CHECK(v.abs().maxCoeff() < 6.0);
  CHECK((v > 3.0).count() > 100);  // the tails are there: P(z > 3) * 135267 = 183
  // A bf16 table holds the float values rounded.
  pkm::ValueTable<pkm::bf16> h(4099, 33);
  pkm::init_values(h, 9);
  for (Index i = 0; i < 4099 * 33; i += 97) CHECK(h.data()[i] == pkm::bf16(a.data()[i]));
}

TEST_CASE("column-major inputs and outputs (Eigen's default) give the row-major results",
          "[layer]") {
  auto c = pkmtest::medium_config();
  c.gating = true;
  const pkm::MemoryLayer<float> layer(c, 31);
  const MatF x = pkmtest::random_matrix(40, c.input_dim, 32).cast<float>();
  const MatF dout = pkmtest::random_matrix(40, c.output_dim, 33).cast<float>();
  pkm::ForwardCache<float> cache;
  MatF out(40, c.output_dim), dx(40, c.input_dim);
  layer.forward(x, out, cache);
  pkm::LayerGradients<float> g(c);
  layer.backward(x, cache, dout, g, dx);

  const Eigen::MatrixXf xc = x, doutc = dout;  // column-major copies
  Eigen::MatrixXf outc(40, c.output_dim), dxc(40, c.input_dim);
  pkm::ForwardCache<float> cache_c;
  layer.forward(xc, outc, cache_c);
  pkm::LayerGradients<float> gc(c);
  layer.backward(xc, cache_c, doutc, gc, dxc);
  CHECK(pkmtest::same_bits(MatF(outc), out));
  CHECK(pkmtest::same_bits(MatF(dxc), dx));
  CHECK(pkmtest::first_gradient_difference(gc, g).empty());
  // Into a block of a bigger column-major matrix; a wrong shape is refused and changes nothing.
  Eigen::MatrixXf big = Eigen::MatrixXf::Zero(50, c.output_dim + 3);
  layer.forward(xc, big.block(5, 1, 40, c.output_dim), cache_c);
  CHECK(pkmtest::same_bits(MatF(big.block(5, 1, 40, c.output_dim)), out));
  Eigen::MatrixXf wrong = Eigen::MatrixXf::Constant(40, c.output_dim + 1, 3.0f);
  CHECK_THROWS_AS(layer.forward(xc, wrong, cache_c), std::invalid_argument);
  CHECK((wrong.array() == 3.0f).all());
}
