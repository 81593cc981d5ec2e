// Finite-difference checks (double) of every parameter, the value table and the input.
#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include <pkm/pkm.hpp>

#include "support.hpp"

using pkm::Index;
using pkmtest::Mat;

namespace {

std::vector<double> flat(const Eigen::Ref<const Mat>& m) {
  return std::vector<double>(m.data(), m.data() + m.size());
}

// Checks d sum(layer(x) * R) against finite differences for every tensor, the table and x.
void check_layer_gradients(const pkm::MemoryConfig& c, std::uint64_t seed) {
  pkm::MemoryLayer<double> layer(c, seed);
  const Index B = 7;
  const Mat x = pkmtest::random_matrix(B, c.input_dim, seed + 1);
  const Mat R = pkmtest::random_matrix(B, c.output_dim, seed + 2);
  pkm::ForwardCache<double> cache;
  layer.forward(x, cache);
  const pkm::IndexMatrix base = cache.indices;
  pkm::LayerGradients<double> g(c);
  Mat dx(B, c.input_dim);
  layer.backward(x, cache, R, g, dx);

  std::vector<std::string> fails;
  int skipped = 0, checked = 0;
  auto loss_at = [&](const Mat& xx) {
    return [&layer, &xx, &R, &base](bool* same) {
      return pkmtest::probe_loss(layer, xx, R, &base, same);
    };
  };
  // Dense parameters.
  for (int t = 0; t < pkm::kNumTensors; ++t) {
    const auto tensor = pkm::Tensor(t);
    if (!layer.params().has(tensor)) continue;
    auto m = layer.params().matrix(tensor);
    const auto st = pkmtest::check_fd(m.data(), m.size(), flat(g.params.matrix(tensor)), loss_at(x),
                                      fails, pkm::tensor_name(tensor));
    skipped += st.skipped;
    checked += st.checked;
  }
  // The value table: every entry of the touched rows and of a few untouched ones.
  Mat dense = Mat::Zero(c.slots(), c.v_dim);
  g.values.add_to(dense);
  auto V = layer.values().matrix();
  for (Index r = 0; r < c.slots(); r += (r % 3 == 0 ? 1 : 2)) {
    const auto st = pkmtest::check_fd(&V(r, 0), c.v_dim, flat(dense.row(r)), loss_at(x), fails,
                                      "values.weight row " + std::to_string(r));
    skipped += st.skipped;
    checked += st.checked;
  }
  // The input.
  Mat xp = x;
  const auto st = pkmtest::check_fd(xp.data(), xp.size(), flat(dx), loss_at(xp), fails, "x", 1000);
  skipped += st.skipped;
  checked += st.checked;

  INFO("checked " << checked << " elements, skipped " << skipped);
  for (const auto& f : fails) INFO(f);
  CHECK(fails.empty());
  CHECK(checked > 100);
  CHECK(skipped * 20 <= checked);  // a perturbation of 1e-6 rarely changes the selection
}

}  // namespace

TEST_CASE("gradients match finite differences: Memory+", "[gradients]") {
  check_layer_gradients(pkmtest::small_config(), 1);
}

TEST_CASE("gradients match finite differences: plain projection, no query bias", "[gradients]") {
  auto c = pkmtest::small_config();
  c.memory_plus = false;
  c.query_bias = false;
  check_layer_gradients(c, 2);
}

TEST_CASE("gradients match finite differences: no projection", "[gradients]") {
  auto c = pkmtest::small_config();
  c.memory_plus = false;
  c.value_projection = false;
  c.output_dim = c.v_dim;
  check_layer_gradients(c, 3);
}

TEST_CASE("gradients match finite differences: gated Memory+", "[gradients]") {
  auto c = pkmtest::small_config();
  c.gating = true;
  check_layer_gradients(c, 4);
}

TEST_CASE("gradients match finite differences: qk-norm", "[gradients]") {
  auto c = pkmtest::small_config();
  c.qk_norm = true;
  check_layer_gradients(c, 5);
  c.qk_norm_scale = 3.5;
  c.gating = true;
  c.memory_plus = false;
  check_layer_gradients(c, 6);
}

TEST_CASE("gradients match finite differences: ReLU weights", "[gradients]") {
  auto c = pkmtest::small_config();
  c.score_activation = pkm::ScoreActivation::relu;
  check_layer_gradients(c, 8);
  c.qk_norm = true;
  c.gating = true;
  check_layer_gradients(c, 9);
}

TEST_CASE("gradients match finite differences: one head, knn = n_keys", "[gradients]") {
  auto c = pkmtest::small_config();
  c.heads = 1;
  c.knn = c.n_keys;
  check_layer_gradients(c, 7);
}

TEST_CASE("gradients match finite differences: two layers sharing one value table",
          "[gradients][shared]") {
  auto c = pkmtest::small_config();
  pkm::ValueTable<double> pool(c.slots(), c.v_dim);
  pkm::init_values(pool, 42);
  auto c2 = c;
  c2.qk_norm = true;
  c2.gating = true;
  pkm::MemoryLayer<double> a(c, pool.view(), 1), b(c2, pool.view(), 2);
  REQUIRE(a.values().data() == pool.data());
  REQUIRE(b.values().data() == pool.data());
  const Index B = 6;
  const Mat xa = pkmtest::random_matrix(B, c.input_dim, 3),
            xb = pkmtest::random_matrix(B, c.input_dim, 4);
  const Mat Ra = pkmtest::random_matrix(B, c.output_dim, 5),
            Rb = pkmtest::random_matrix(B, c.output_dim, 6);
  pkm::ForwardCache<double> ca, cb;
  a.forward(xa, ca);
  b.forward(xb, cb);
  pkm::LayerParameters<double> ga(c), gb(c2);
  pkm::SparseRowGrad<double> gpool;  // both layers' value gradients merge here
  a.backward(xa, ca, Ra, ga, gpool);
  b.backward(xb, cb, Rb, gb, gpool);
  Mat dense = Mat::Zero(c.slots(), c.v_dim);
  gpool.add_to(dense);

  const pkm::IndexMatrix ia = ca.indices, ib = cb.indices;
  auto loss = [&](bool* same) {
    bool sa = true, sb = true;
    const double l =
        pkmtest::probe_loss(a, xa, Ra, &ia, &sa) + pkmtest::probe_loss(b, xb, Rb, &ib, &sb);
    *same = sa && sb;
    return l;
  };
  std::vector<std::string> fails;
  int checked = 0;
  for (Index r = 0; r < c.slots(); ++r) {
    checked += pkmtest::check_fd(pool.row(r), c.v_dim, flat(dense.row(r)), loss, fails,
                                 "pool row " + std::to_string(r))
                   .checked;
  }
  for (const auto& f : fails) INFO(f);
  CHECK(fails.empty());
  CHECK(checked > 100);
  // Each layer's own gradients also hold: a's keys through a alone.
  auto keys = a.params().keys();
  std::vector<double> gk(ga.keys().data(), ga.keys().data() + ga.keys().size());
  pkmtest::check_fd(keys.data(), keys.size(), gk, loss, fails, "a.keys");
  CHECK(fails.empty());
}
