// Optimizers: AdamW, lazy Adam and row-wise Adagrad against plain-loop references of the
// same rules; the fused backward + update against backward-then-step; state save/load;
// errors; and short training runs whose loss must fall.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <omp.h>

#include <pkm/io/checkpoint.hpp>
#include <pkm/io/optimizer_state.hpp>
#include <pkm/pkm.hpp>

#include "support.hpp"

#ifndef PKM_TEST_DATA
#error "PKM_TEST_DATA must name tests/data"
#endif

using Catch::Contains;
using pkmtest::Mat;
using pkmtest::same_bits;
using MatF = pkm::RowMatrix<float>;
using pkm::Index;

namespace {

// ---- plain-loop references ----------------------------------------------------------------

struct RefAdamState {
  std::vector<double> m, v;
};

/// One AdamW update of n elements at step t, written straight from the formula.
void ref_adam(double* w, const double* g, double scale, RefAdamState& s, std::size_t off,
              std::size_t n, std::int64_t t, const pkm::optim::AdamOptions& o) {
  for (std::size_t i = 0; i < n; ++i) {
    const double gi = scale * g[i];
    double& m = s.m[off + i];
    double& v = s.v[off + i];
    m = o.beta1 * m + (1 - o.beta1) * gi;
    v = o.beta2 * v + (1 - o.beta2) * gi * gi;
    const double mhat = m / (1 - std::pow(o.beta1, double(t)));
    const double vhat = v / (1 - std::pow(o.beta2, double(t)));
    w[i] = w[i] * (1 - o.lr * o.weight_decay) - o.lr * mhat / (std::sqrt(vhat) + o.eps);
  }
}

double ref_clip_scale(double norm, double max_norm) {
  if (max_norm <= 0) return 1.0;
  return std::min(1.0, max_norm / (norm + 1e-6));
}

/// A sparse gradient of `rows` random distinct rows (sorted) of a table of `table_rows`.
pkm::SparseRowGrad<double> random_sparse_grad(Index table_rows, Index dim, Index rows,
                                              std::uint64_t seed, double scale = 1.0) {
  std::mt19937_64 rng(seed);
  std::set<std::int64_t> picked;
  while (static_cast<Index>(picked.size()) < rows)
    picked.insert(static_cast<std::int64_t>(rng() % table_rows));
  pkm::SparseRowGrad<double> g;
  g.dim = dim;
  g.rows.assign(picked.begin(), picked.end());
  g.values = pkmtest::random_matrix(rows, dim, seed + 1, scale);
  return g;
}

template <class T>
pkm::RowMatrix<T> copy_table(const pkm::ValueTable<T>& t) {
  return t.matrix();
}

}  // namespace

// ---- AdamW --------------------------------------------------------------------------------

TEST_CASE("AdamW follows the reference rule, with weight decay overrides and clipping", "[optim]") {
  for (double max_norm : {0.0, 0.5}) {
    INFO("max_grad_norm " << max_norm);
    pkm::optim::AdamOptions o;
    o.lr = 0.01;
    o.weight_decay = 0.1;
    o.max_grad_norm = max_norm;
    Mat a = pkmtest::random_matrix(7, 5, 1), b = pkmtest::random_matrix(1, 9, 2);
    Mat ga(7, 5), gb(1, 9);
    Mat ra = a, rb = b;
    RefAdamState sa{std::vector<double>(35), std::vector<double>(35)},
        sb{std::vector<double>(9), std::vector<double>(9)};
    pkm::optim::AdamW<double> opt(o);
    opt.add("a", a, ga);
    opt.add("b", b, gb, 0.0);  // no decay on b
    CHECK(opt.num_parameters() == 44);
    auto ob = o;
    ob.weight_decay = 0.0;
    for (int t = 1; t <= 4; ++t) {
      // Assign into the registered buffers (a move-assignment would swap them away).
      ga.array() = pkmtest::random_matrix(7, 5, 10 + t, 2.0).array();
      gb.array() = pkmtest::random_matrix(1, 9, 20 + t, 2.0).array();
      const double norm = std::sqrt(ga.squaredNorm() + gb.squaredNorm());
      const double got_norm = opt.step();
      CHECK(got_norm == Approx(norm).epsilon(1e-12));
      const double scale = ref_clip_scale(norm, max_norm);
      ref_adam(ra.data(), ga.data(), scale, sa, 0, 35, t, o);
      ref_adam(rb.data(), gb.data(), scale, sb, 0, 9, t, ob);
      CHECK((a - ra).cwiseAbs().maxCoeff() < 1e-12);
      CHECK((b - rb).cwiseAbs().maxCoeff() < 1e-12);
    }
    CHECK(opt.steps() == 4);
    opt.zero_grad();
    CHECK(ga.isZero(0.0));
  }
}

TEST_CASE("AdamW registers a memory layer's tensors under their reference names", "[optim]") {
  const auto c = pkmtest::small_config();
  pkm::MemoryLayer<double> layer(c, 3);
  pkm::LayerGradients<double> g(c);
  pkm::optim::AdamW<double> opt;
  opt.add("mem.", layer.params(), g.params);
  std::vector<std::string> names;
  opt.for_each_state([&](const std::string& n, const std::vector<std::int64_t>&, auto*, auto...) {
    names.push_back(n);
  });
  CHECK(names.front() == "step");
  CHECK(std::find(names.begin(), names.end(), "mem.keys.exp_avg") != names.end());
  CHECK(std::find(names.begin(), names.end(), "mem.query_proj.query_mlps.0.weight.exp_avg_sq") !=
        names.end());
  // A zero gradient with no decay leaves the parameters as they are.
  const Mat before = layer.params().keys();
  opt.step();
  CHECK(Mat(layer.params().keys()) == before);
}

TEST_CASE("AdamW rejects bad options and registrations, and a non-finite gradient changes nothing",
          "[optim][errors]") {
  using pkm::optim::AdamOptions;
  auto bad = [](auto set) {
    AdamOptions o;
    set(o);
    return o;
  };
  CHECK_THROWS_WITH(pkm::optim::AdamW<float>(bad([](AdamOptions& o) { o.lr = -1; })),
                    Contains("lr = -1"));
  CHECK_THROWS_WITH(pkm::optim::AdamW<float>(bad([](AdamOptions& o) { o.beta1 = 1.0; })),
                    Contains("beta1"));
  CHECK_THROWS_WITH(pkm::optim::AdamW<float>(bad([](AdamOptions& o) { o.beta2 = -0.1; })),
                    Contains("beta2"));
  CHECK_THROWS_WITH(pkm::optim::AdamW<float>(bad([](AdamOptions& o) { o.eps = 0; })),
                    Contains("eps"));
  CHECK_THROWS_WITH(pkm::optim::AdamW<float>(bad([](AdamOptions& o) { o.weight_decay = NAN; })),
                    Contains("weight_decay"));
  CHECK_THROWS_WITH(pkm::optim::AdamW<float>(bad([](AdamOptions& o) { o.max_grad_norm = -2; })),
                    Contains("max_grad_norm"));
  pkm::optim::AdamW<double> opt;
  CHECK_THROWS_WITH(opt.set_lr(INFINITY), Contains("lr"));
  Mat p = pkmtest::random_matrix(3, 4, 5), g = Mat::Zero(3, 4), g2 = Mat::Zero(4, 3),
      wide = Mat::Zero(3, 8);
  CHECK_THROWS_WITH(opt.add("p", p, g2), Contains("expected the parameter's 3 x 4"));
  CHECK_THROWS_WITH(opt.add("p", p, wide.leftCols(4)), Contains("contiguous"));
  opt.add("p", p, g);
  CHECK_THROWS_WITH(opt.add("p", p, g), Contains("already registered"));
  CHECK_THROWS_WITH(opt.add("", p, g), Contains("empty"));
  CHECK_THROWS_WITH(opt.add("q", nullptr, g.data(), 12), Contains("null"));
  g(1, 2) = NAN;
  const Mat before = p;
  CHECK_THROWS_WITH(opt.step(), Contains("'p'") && Contains("element 6"));
  CHECK(p == before);
  CHECK(opt.steps() == 0);
}

TEST_CASE("AdamW and lazy Adam follow torch.optim.AdamW with clip_grad_norm_ (golden file)",
          "[optim][golden]") {
  const pkm::io::SafetensorsFile f(std::string(PKM_TEST_DATA) + "/adamw.safetensors");
  const auto& meta = f.metadata();
  pkm::optim::AdamOptions o;
  o.lr = std::stod(meta.at("lr"));
  o.beta1 = std::stod(meta.at("beta1"));
  o.beta2 = std::stod(meta.at("beta2"));
  o.eps = std::stod(meta.at("eps"));
  o.weight_decay = std::stod(meta.at("weight_decay"));
  o.max_grad_norm = std::stod(meta.at("max_grad_norm"));
  auto read = [&](const std::string& name) {
    Mat m(6, 5);
    f.read(name, m.data(), std::size_t(m.size()));
    return m;
  };
  Mat w = read("w0"), g = Mat::Zero(6, 5);
  pkm::ValueTable<double> table(6, 5);
  table.matrix() = w;
  pkm::optim::AdamW<double> adam(o);
  adam.add("w", w, g);
  pkm::optim::LazyAdam<double> lazy(table, o);
  for (int t = 1; t <= 4; ++t) {
    g.array() = read("grad." + std::to_string(t)).array();  // into the registered buffer
    pkm::SparseRowGrad<double> sg;
    sg.dim = 5;
    sg.rows = {0, 1, 2, 3, 4, 5};
    sg.values = g;
    adam.step();
    lazy.step(table, sg);
    const Mat expected = read("expected." + std::to_string(t));
    INFO("step " << t);
    CHECK((w - expected).cwiseAbs().maxCoeff() < 1e-13);
    CHECK((table.matrix() - expected).cwiseAbs().maxCoeff() < 1e-13);
  }
}

// ---- lazy Adam -------------------------------------------------------------------------

TEST_CASE("lazy Adam equals dense AdamW when every row is touched at every step", "[optim]") {
  const Index rows = 37, dim = 11;
  pkm::optim::AdamOptions o;
  o.lr = 3e-3;
  o.weight_decay = 0.05;
  pkm::ValueTable<double> table(rows, dim);
  table.matrix() = pkmtest::random_matrix(rows, dim, 7);
  Mat dense = copy_table(table), dense_grad(rows, dim);
  pkm::optim::LazyAdam<double> lazy(table, o);
  pkm::optim::AdamW<double> adam(o);
  adam.add("table", dense, dense_grad);
  for (int t = 1; t <= 5; ++t) {
    pkm::SparseRowGrad<double> g = random_sparse_grad(rows, dim, rows, 100 + t);
    dense_grad = g.values;  // all rows, in order
    const double n1 = lazy.step(table, g), n2 = adam.step();
    CHECK(n1 == Approx(n2).epsilon(1e-14));
    CHECK(same_bits(table.matrix(), dense));
  }
  for (Index r = 0; r < rows; ++r) CHECK(lazy.row_steps(r) == 5);
}

TEST_CASE("lazy Adam updates only the given rows, each with its own step count", "[optim]") {
  const Index rows = 50, dim = 6;
  for (double max_norm : {0.0, 1.5}) {
    INFO("max_grad_norm " << max_norm);
    pkm::optim::AdamOptions o;
    o.lr = 1e-2;
    o.max_grad_norm = max_norm;
    pkm::ValueTable<double> table(rows, dim);
    table.matrix() = pkmtest::random_matrix(rows, dim, 8);
    Mat ref = copy_table(table);
    RefAdamState st{std::vector<double>(rows * dim), std::vector<double>(rows * dim)};
    std::vector<std::int64_t> t_row(rows, 0);
    pkm::optim::LazyAdam<double> lazy(table, o);
    for (int t = 1; t <= 6; ++t) {
      const auto g = random_sparse_grad(rows, dim, 4 + 3 * t, 200 + t, 3.0);
      const Mat before = copy_table(table);
      const double norm = lazy.step(table, g);
      CHECK(norm == Approx(g.values.norm()).epsilon(1e-12));
      const double scale = ref_clip_scale(g.values.norm(), max_norm);
      std::set<std::int64_t> touched(g.rows.begin(), g.rows.end());
      for (Index u = 0; u < g.size(); ++u) {
        const auto r = g.rows[u];
        ref_adam(ref.row(r).data(), g.values.row(u).data(), scale, st, r * dim, dim, ++t_row[r], o);
      }
      CHECK((table.matrix() - ref).cwiseAbs().maxCoeff() < 1e-12);
      for (Index r = 0; r < rows; ++r) {
        if (!touched.count(r)) CHECK(same_bits(table.matrix().row(r), before.row(r)));
        CHECK(lazy.row_steps(r) == t_row[r]);
      }
    }
    CHECK(lazy.steps() == 6);
  }
}

// ---- row-wise Adagrad --------------------------------------------------------------------

TEST_CASE("row-wise Adagrad follows FBGEMM's rule: one accumulator per row", "[optim]") {
  const Index rows = 40, dim = 9;
  for (double wd : {0.0, 0.01}) {
    for (double max_norm : {0.0, 2.0}) {
      INFO("weight_decay " << wd << ", max_grad_norm " << max_norm);
      pkm::optim::RowWiseAdagradOptions o;
      o.lr = 0.05;
      o.eps = 1e-6;
      o.initial_accumulator = 0.1;
      o.weight_decay = wd;
      o.max_grad_norm = max_norm;
      pkm::ValueTable<double> table(rows, dim);
      table.matrix() = pkmtest::random_matrix(rows, dim, 9);
      Mat ref = copy_table(table);
      std::vector<double> h(rows, 0.1);
      pkm::optim::RowWiseAdagrad<double> opt(table, o);
      for (int t = 1; t <= 5; ++t) {
        const auto g = random_sparse_grad(rows, dim, 10, 300 + t, 2.0);
        opt.step(table, g);
        const double scale = ref_clip_scale(g.values.norm(), max_norm);
        for (Index u = 0; u < g.size(); ++u) {
          const auto r = g.rows[u];
          std::vector<double> gd(dim);
          double sq = 0;
          for (Index d = 0; d < dim; ++d) {
            gd[d] = scale * g.values(u, d) + wd * ref(r, d);
            sq += gd[d] * gd[d];
          }
          h[r] += sq / dim;
          for (Index d = 0; d < dim; ++d) ref(r, d) -= o.lr * gd[d] / (std::sqrt(h[r]) + o.eps);
        }
        CHECK((table.matrix() - ref).cwiseAbs().maxCoeff() < 1e-12);
      }
      for (Index r = 0; r < rows; ++r) CHECK(opt.accumulator(r) == Approx(h[r]).epsilon(1e-12));
    }
  }
}

TEST_CASE("sparse optimizers check everything before touching the table", "[optim][errors]") {
  const Index rows = 20, dim = 4;
  pkm::ValueTable<double> table(rows, dim);
  table.matrix() = pkmtest::random_matrix(rows, dim, 10);
  const Mat before = copy_table(table);
  pkm::optim::LazyAdam<double> adam(table);
  pkm::optim::RowWiseAdagrad<double> ada(table);
  auto g = random_sparse_grad(rows, dim, 5, 11);
  auto run_both = [&](const pkm::SparseRowGrad<double>& grad, const std::string& what) {
    CHECK_THROWS_WITH(adam.step(table, grad), Contains(what));
    CHECK_THROWS_WITH(ada.step(table, grad), Contains(what));
  };
  auto out_of_range = g;
  out_of_range.rows.back() = rows;
  CHECK_THROWS_AS(adam.step(table, out_of_range), std::out_of_range);
  run_both(out_of_range, "outside the table of 20 rows");
  auto unsorted = g;
  std::swap(unsorted.rows[0], unsorted.rows[1]);
  run_both(unsorted, "not sorted and unique");
  auto wrong_dim = g;
  wrong_dim.dim = 3;
  wrong_dim.values.conservativeResize(5, 3);
  run_both(wrong_dim, "gradient dim = 3, expected the table's 4");
  auto nan = g;
  nan.values(2, 1) = NAN;
  CHECK_THROWS_AS(adam.step(table, nan), std::runtime_error);
  run_both(nan, "row " + std::to_string(g.rows[2]));
  pkm::ValueTable<double> other(rows + 1, dim);
  CHECK_THROWS_WITH(adam.step(other, g), Contains("the 20 x 4 the optimizer was made for"));
  CHECK(same_bits(table.matrix(), before));
  CHECK(adam.steps() == 0);
  CHECK(adam.row_steps(g.rows[0]) == 0);
  CHECK(ada.accumulator(g.rows[0]) == 0.0);
  pkm::optim::RowWiseAdagradOptions bad;
  bad.eps = -1;
  CHECK_THROWS_WITH(pkm::optim::RowWiseAdagrad<double>(table, bad), Contains("eps = -1"));
  CHECK_THROWS_WITH(pkm::optim::LazyAdam<double>(0, 4), Contains("rows >= 1"));
}

TEST_CASE("set_lr changes the rate of the next step", "[optim]") {
  // With lr 0 an update changes nothing (decoupled decay is scaled by lr too); back at the
  // first rate the step is as if set_lr had not been called.
  const Index rows = 6, dim = 3;
  const auto g = random_sparse_grad(rows, dim, rows, 90);
  pkm::optim::AdamOptions o;
  o.lr = 0.1;
  o.weight_decay = 0.5;
  auto check = [&](auto& opt, pkm::ValueTable<double>& table) {
    const Mat before = copy_table(table);
    opt.set_lr(0.0);
    opt.step(table, g);
    CHECK(same_bits(table.matrix(), before));
    opt.set_lr(0.1);
    CHECK(opt.options().lr == 0.1);
    opt.step(table, g);
    CHECK_FALSE(same_bits(table.matrix(), before));
  };
  pkm::ValueTable<double> t1(rows, dim), t2(rows, dim);
  t1.matrix() = pkmtest::random_matrix(rows, dim, 91);
  t2.matrix() = t1.matrix();
  pkm::optim::LazyAdam<double> lazy(t1, o);
  check(lazy, t1);
  pkm::optim::RowWiseAdagradOptions ao;
  ao.lr = 0.1;
  pkm::optim::RowWiseAdagrad<double> ada(t2, ao);
  check(ada, t2);
  CHECK_THROWS_WITH(ada.set_lr(-1), Contains("lr = -1"));
  CHECK(ada.options().lr == 0.1);

  Mat w = pkmtest::random_matrix(2, 2, 92), gw = pkmtest::random_matrix(2, 2, 93);
  const Mat before = w;
  pkm::optim::AdamW<double> dense(o);
  dense.add("w", w, gw);
  dense.set_lr(0.0);
  dense.step();
  CHECK(same_bits(w, before));
  dense.set_lr(0.1);
  dense.step();
  CHECK_FALSE(same_bits(w, before));
}

TEST_CASE("the fused update refuses non-finite inputs and rows outside the table before any write",
          "[optim][fused][errors]") {
  const Index rows = 30, dim = 5, batch = 4, bag = 3;
  pkm::ValueTable<float> table(rows, dim);
  table.matrix() = pkmtest::random_matrix(rows, dim, 94).cast<float>();
  const MatF before = table.matrix();
  pkm::optim::LazyAdam<float> opt(table);
  pkm::IndexMatrix idx(batch, bag);
  for (Index i = 0; i < idx.size(); ++i) idx.data()[i] = i % rows;
  MatF w = pkmtest::random_matrix(batch, bag, 95).cast<float>();
  MatF dy = pkmtest::random_matrix(batch, dim, 96).cast<float>();
  MatF dw(batch, bag);
  dy(1, 2) = NAN;
  CHECK_THROWS_WITH(pkm::embedding_bag_backward_update(table, idx, w, dy, dw, opt),
                    Contains("dy(1, 2) = nan is not finite") && Contains("nothing was updated"));
  dy(1, 2) = 0.0f;
  w(0, 0) = INFINITY;
  CHECK_THROWS_WITH(pkm::embedding_bag_backward_update(table, idx, w, dy, dw, opt),
                    Contains("weights(0, 0) = inf is not finite"));
  // step_segments called directly with a row past the table.
  std::vector<pkm::detail::RowContribution<float>> items{{3, 0, 1.0f}, {rows, 1, 1.0f}};
  pkm::detail::GroupScratch<float> group;
  pkm::detail::RowSegments seg;
  pkm::detail::group_by_row(items, rows + 1, group, seg);
  CHECK_THROWS_AS(opt.step_segments(table, items, seg,
                                    [&](std::int64_t t, std::int64_t) { return dy.row(t).data(); }),
                  std::out_of_range);
  CHECK(same_bits(table.matrix(), before));
  CHECK(opt.steps() == 0);
}

// ---- fused backward + update ---------------------------------------------------------------

TEMPLATE_TEST_CASE("the fused bag backward + update equals backward then step, bit for bit",
                   "[optim][fused]", pkm::optim::LazyAdam<float>,
                   pkm::optim::RowWiseAdagrad<float>) {
  const Index rows = 300, dim = 24, batch = 70, bag = 12;
  for (double max_norm : {0.0, 0.05}) {
    INFO("max_grad_norm " << max_norm);
    typename std::decay_t<decltype(std::declval<TestType>().options())> o;
    o.lr = 0.02;
    o.max_grad_norm = max_norm;
    pkm::ValueTable<float> a(rows, dim), b(rows, dim);
    a.matrix() = pkmtest::random_matrix(rows, dim, 12).cast<float>();
    b.matrix() = a.matrix();
    TestType opt_a(a, o), opt_b(b, o);
    std::mt19937_64 rng(13);
    for (int step = 0; step < 3; ++step) {
      pkm::IndexMatrix idx(batch, bag);
      for (Index i = 0; i < idx.size(); ++i)
        idx.data()[i] = static_cast<std::int64_t>(rng() % 60);  // many repeats
      const MatF w = pkmtest::random_matrix(batch, bag, 14 + step).cast<float>();
      const MatF dy = pkmtest::random_matrix(batch, dim, 15 + step).cast<float>();
      MatF dw_a(batch, bag), dw_b(batch, bag);
      pkm::SparseRowGrad<float> g;
      pkm::embedding_bag_backward(a, idx, w, dy, dw_a, g);
      const double n_a = opt_a.step(a, g);
      const double n_b = pkm::embedding_bag_backward_update(b, idx, w, dy, dw_b, opt_b);
      CHECK(n_a == n_b);
      CHECK(same_bits(dw_a, dw_b));
      CHECK(same_bits(a.matrix(), b.matrix()));
    }
  }
}

TEMPLATE_TEST_CASE("a layer's fused backward equals backward then step, for fp32 and bf16 tables",
                   "[optim][fused][layer]", float, pkm::bf16) {
  auto c = pkmtest::medium_config();
  c.gating = true;
  pkm::MemoryLayer<float, TestType> a(c, pkm::ValueTable<TestType>(c.slots(), c.v_dim), 21);
  pkm::init_values(a.values(), 21);
  pkm::MemoryLayer<float, TestType> b = a;
  pkm::optim::AdamOptions o;
  o.lr = 0.01;
  o.max_grad_norm = 0.5;
  pkm::optim::LazyAdam<float> opt_a(a.values(), o), opt_b(b.values(), o);
  for (int step = 0; step < 3; ++step) {
    const MatF x = pkmtest::random_matrix(130, c.input_dim, 22 + step).cast<float>();
    const MatF dout = pkmtest::random_matrix(130, c.output_dim, 23 + step).cast<float>();
    pkm::ForwardCache<float> ca, cb;
    a.forward(x, ca);
    b.forward(x, cb);
    pkm::LayerGradients<float> ga(c);
    pkm::LayerParameters<float> gb(c);
    gb.set_zero();
    ga.zero();
    MatF dxa(130, c.input_dim), dxb(130, c.input_dim);
    a.backward(x, ca, dout, ga, dxa);
    const double na = opt_a.step(a.values(), ga.values);
    const double nb = b.backward_fused(x, cb, dout, gb, opt_b, dxb);
    CHECK(na == nb);
    CHECK(same_bits(dxa, dxb));
    for (int t = 0; t < pkm::kNumTensors; ++t) {
      if (!gb.has(pkm::Tensor(t))) continue;
      INFO(pkm::tensor_name(pkm::Tensor(t)));
      CHECK(same_bits(ga.params.matrix(pkm::Tensor(t)), gb.matrix(pkm::Tensor(t))));
    }
    CHECK(same_bits(a.values().matrix(), b.values().matrix()));
  }
  // An optimizer made for another table is refused before anything is written.
  pkm::optim::LazyAdam<float> wrong(c.slots() - 1, c.v_dim);
  const MatF x = pkmtest::random_matrix(8, c.input_dim, 40).cast<float>();
  pkm::ForwardCache<float> cache;
  const MatF out = b.forward(x, cache);
  pkm::LayerParameters<float> g(c);
  g.set_zero();
  CHECK_THROWS_WITH(
      b.backward_fused(x, cache, out, g, wrong),
      Contains("pkm::MemoryLayer::backward_fused: table is 1024 x 40, expected the 1023 x 40 "
               "the optimizer was made for"));
  for (int t = 0; t < pkm::kNumTensors; ++t) {
    if (g.has(pkm::Tensor(t))) CHECK(g.matrix(pkm::Tensor(t)).isZero(0.0));
  }
}

// ---- state save / load ------------------------------------------------------------------

namespace {

/// Mean squared error 0.5 * mean over tokens of |out - y|^2 and its gradient.
double mse(const MatF& out, const MatF& y, MatF& dout) {
  dout = (out - y) / static_cast<float>(out.rows());
  return 0.5 * static_cast<double>((out - y).squaredNorm()) / static_cast<double>(out.rows());
}

/// A small regression run: a layer, AdamW on its dense parameters, a sparse optimizer on
/// its values (fused or not).
template <class ValueOpt>
struct Trainer {
  pkm::MemoryLayer<float> layer;
  pkm::LayerGradients<float> grads;
  pkm::optim::AdamW<float> dense;
  ValueOpt values;
  bool fused;

  template <class VOpts>
  Trainer(pkm::MemoryLayer<float> l, const VOpts& vo, bool fused_)
      : layer(std::move(l)),
        grads(layer.config()),
        dense(dense_options()),
        values(layer.values(), vo),
        fused(fused_) {
    dense.add("mem.", layer.params(), grads.params);
  }
  static pkm::optim::AdamOptions dense_options() {
    pkm::optim::AdamOptions o;
    o.lr = 3e-3;
    o.max_grad_norm = 1.0;
    return o;
  }
  double step(const MatF& x, const MatF& y) {
    pkm::ForwardCache<float> cache;
    const MatF out = layer.forward(x, cache);
    MatF dout;
    const double loss = mse(out, y, dout);
    grads.zero();
    if (fused) {
      layer.backward_fused(x, cache, dout, grads.params, values);
    } else {
      layer.backward(x, cache, dout, grads);
      values.step(layer.values(), grads.values);
    }
    dense.step();
    return loss;
  }
};

pkm::optim::AdamOptions value_adam() {
  pkm::optim::AdamOptions o;
  o.lr = 1e-2;
  o.max_grad_norm = 5.0;
  return o;
}

}  // namespace

TEST_CASE("training resumed from saved layer and optimizer state matches uninterrupted training",
          "[optim][io]") {
  const auto c = pkmtest::medium_config();
  const MatF x = pkmtest::random_matrix(96, c.input_dim, 50).cast<float>();
  const MatF y = pkmtest::random_matrix(96, c.output_dim, 51).cast<float>();
  Trainer<pkm::optim::LazyAdam<float>> straight(pkm::MemoryLayer<float>(c, 52), value_adam(),
                                                false);
  for (int i = 0; i < 5; ++i) straight.step(x, y);

  Trainer<pkm::optim::LazyAdam<float>> first(pkm::MemoryLayer<float>(c, 52), value_adam(), false);
  for (int i = 0; i < 3; ++i) first.step(x, y);
  pkm::io::SafetensorsWriter w;
  pkm::io::add_layer(w, first.layer, "model.mem.");
  pkm::io::add_optimizer_state(w, first.dense, "optim.dense.");
  pkm::io::add_optimizer_state(w, first.values, "optim.values.");
  const auto file = pkm::io::SafetensorsFile::from_bytes(w.to_bytes(), "resume.safetensors");
  CHECK(file.has("optim.values.row_step"));
  CHECK(file.has("optim.dense.model.mem.keys.exp_avg") ==
        false);  // dense names are the registered ones
  CHECK(file.has("optim.dense.mem.keys.exp_avg"));

  pkm::io::LoadOptions lo;
  lo.prefix = "model.mem.";
  Trainer<pkm::optim::LazyAdam<float>> resumed(pkm::io::load_layer<float>(file, lo), value_adam(),
                                               false);
  pkm::io::load_optimizer_state(file, resumed.dense, "optim.dense.");
  pkm::io::load_optimizer_state(file, resumed.values, "optim.values.");
  CHECK(resumed.dense.steps() == 3);
  CHECK(resumed.values.steps() == 3);
  for (int i = 0; i < 2; ++i) resumed.step(x, y);
  CHECK(same_bits(resumed.layer.values().matrix(), straight.layer.values().matrix()));
  for (int t = 0; t < pkm::kNumTensors; ++t) {
    if (!c.slots() || !straight.layer.params().has(pkm::Tensor(t))) continue;
    CHECK(same_bits(resumed.layer.params().matrix(pkm::Tensor(t)),
                    straight.layer.params().matrix(pkm::Tensor(t))));
  }

  // State for another shape is refused, naming the tensor, and nothing is loaded.
  pkm::optim::RowWiseAdagrad<float> other(c.slots() + 1, c.v_dim);
  pkm::io::SafetensorsWriter w2;
  pkm::optim::RowWiseAdagrad<float> small(c.slots(), c.v_dim);
  pkm::io::add_optimizer_state(w2, small, "ada.");
  const auto f2 = pkm::io::SafetensorsFile::from_bytes(w2.to_bytes(), "ada.safetensors");
  CHECK_THROWS_WITH(pkm::io::load_optimizer_state(f2, other, "ada."),
                    Contains("'ada.sum'") && Contains("expected [1025]"));
  CHECK_THROWS_WITH(pkm::io::load_optimizer_state(f2, other, "nope."),
                    Contains("'nope.step' is missing"));
  // A float tensor where the step count (an integer) belongs.
  pkm::io::SafetensorsWriter w3;
  const float one = 1.0f;
  const std::vector<float> sums(static_cast<std::size_t>(c.slots()), 0.0f);
  w3.add("ada.step", {1}, &one);
  w3.add("ada.sum", {c.slots()}, sums.data());
  const auto f3 = pkm::io::SafetensorsFile::from_bytes(w3.to_bytes(), "float-step.safetensors");
  CHECK_THROWS_WITH(pkm::io::load_optimizer_state(f3, small, "ada."),
                    Contains("'ada.step' has dtype F32, expected an integer dtype"));
  CHECK(small.steps() == 0);
  CHECK(other.steps() == 0);
}

// ---- training ----------------------------------------------------------------------------

TEST_CASE("short training runs: the loss falls with each value optimizer, fused or not",
          "[optim][train]") {
  const auto c = pkmtest::medium_config();
  const MatF x = pkmtest::random_matrix(256, c.input_dim, 60).cast<float>();
  const MatF y = pkmtest::random_matrix(256, c.output_dim, 61, 0.5).cast<float>();
  pkm::optim::RowWiseAdagradOptions ada;
  ada.lr = 0.05;
  ada.max_grad_norm = 5.0;
  for (bool fused : {false, true}) {
    INFO((fused ? "fused" : "backward then step"));
    Trainer<pkm::optim::LazyAdam<float>> t1(pkm::MemoryLayer<float>(c, 62), value_adam(), fused);
    Trainer<pkm::optim::RowWiseAdagrad<float>> t2(pkm::MemoryLayer<float>(c, 62), ada, fused);
    double first1 = 0, first2 = 0, last1 = 0, last2 = 0;
    for (int i = 0; i < 60; ++i) {
      last1 = t1.step(x, y);
      last2 = t2.step(x, y);
      if (i == 0) first1 = last1, first2 = last2;
    }
    INFO("lazy Adam " << first1 << " -> " << last1 << ", row-wise Adagrad " << first2 << " -> "
                      << last2);
    CHECK(last1 < 0.5 * first1);
    CHECK(last2 < 0.5 * first2);
  }
}

TEST_CASE("training steps give the same bits with 1 and 2 threads", "[optim][threads]") {
  const auto c = pkmtest::medium_config();
  const MatF x = pkmtest::random_matrix(200, c.input_dim, 70).cast<float>();
  const MatF y = pkmtest::random_matrix(200, c.output_dim, 71).cast<float>();
  struct Result {
    MatF values, keys, wq;
  };
  auto run = [&](int threads, bool fused) {
    omp_set_num_threads(threads);
    Trainer<pkm::optim::LazyAdam<float>> t(pkm::MemoryLayer<float>(c, 72), value_adam(), fused);
    for (int i = 0; i < 4; ++i) t.step(x, y);
    return Result{t.layer.values().matrix(), t.layer.params().keys(),
                  t.layer.params().query_weight()};
  };
  const int saved = omp_get_max_threads();
  for (bool fused : {false, true}) {
    const Result one = run(1, fused), two = run(2, fused);
    CHECK(same_bits(one.values, two.values));
    CHECK(same_bits(one.keys, two.keys));
    CHECK(same_bits(one.wq, two.wq));
  }
  omp_set_num_threads(saved);
}

TEST_CASE(
    "AdamW takes any Eigen storage order and std::vector, and refuses a buffer moved after add",
    "[optim][errors]") {
  using ColF = Eigen::MatrixXf;  // Eigen's default: column-major
  const ColF p0 = pkmtest::random_matrix(3, 4, 90).cast<float>(),
             g0 = pkmtest::random_matrix(3, 4, 91).cast<float>();
  ColF pc = p0, gc = g0;
  MatF pr = p0, gr = g0;
  std::vector<float> pv(p0.data(), p0.data() + 12),
      gv(g0.data(), g0.data() + 12);  // column-major order
  pkm::optim::AdamW<float> a, b, c;
  a.add("w", pc, gc);
  b.add("w", pr, gr);
  c.add("w", pv, gv);
  a.step();
  b.step();
  c.step();
  CHECK(same_bits(MatF(pc), pr));
  CHECK(std::equal(pv.begin(), pv.end(), pc.data()));
  CHECK_FALSE(same_bits(MatF(pc), MatF(p0)));

  gr = MatF::Ones(3, 4);  // assigning into it keeps its buffer
  CHECK_NOTHROW(b.step());
  gr = MatF(
      MatF::Ones(3, 4));  // move-assigning swaps in another buffer: the registered one is freed
  const MatF before = pr;
  CHECK_THROWS_WITH(b.step(), Contains("'w'") && Contains("move-assigned or resized"));
  CHECK_THROWS_AS(b.zero_grad(), std::runtime_error);
  CHECK(same_bits(pr, before));
  gv.resize(1000);  // reallocates
  CHECK_THROWS_AS(c.step(), std::runtime_error);

  float buf[9] = {};
  Eigen::Map<MatF, 0, Eigen::OuterStride<>> strided(buf, 2, 2, Eigen::OuterStride<>(3));
  MatF g22 = MatF::Zero(2, 2);
  CHECK_THROWS_WITH(a.add("strided", strided, g22), Contains("contiguous"));
  ColF g34 = ColF::Zero(3, 4);
  MatF p34 = MatF::Zero(3, 4);
  CHECK_THROWS_WITH(a.add("mixed", p34, g34), Contains("same storage order"));
  std::vector<float> short_grad(3);
  CHECK_THROWS_WITH(a.add("v", pv, short_grad), Contains("has 3 elements"));
}
