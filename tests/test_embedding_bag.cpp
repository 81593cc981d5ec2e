#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include <pkm/embedding_bag_ref.hpp>
#include <pkm/pkm.hpp>

#include "support.hpp"

using pkm::Index;
using Mat = pkm::RowMatrix<double>;
using MatF = pkm::RowMatrix<float>;

namespace {
pkm::IndexMatrix random_indices(Index B, Index L, Index rows, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<Index> u(0, rows - 1);
  pkm::IndexMatrix idx(B, L);
  for (Index i = 0; i < idx.size(); ++i) idx.data()[i] = u(rng);
  return idx;
}
}  // namespace

template <class T>
void check_gather_against_naive() {
  // Widths that use the 256-wide (AVX-512) and 64-wide register blocks, the 8-wide remainder
  // and the scalar tail.
  for (Index dim : {1, 3, 8, 33, 64, 71, 130, 200, 256, 300, 583}) {
    pkm::ValueTable<T> table(97, dim);
    pkm::init_values(table, 5);
    const auto idx = random_indices(70, 12, 97, dim);
    const MatF w = pkmtest::random_matrix(70, 12, 9).cast<float>();
    MatF fast(70, dim), naive(70, dim);
    pkm::embedding_bag(table, idx, w, fast);
    pkm::embedding_bag_naive(table, idx, w, naive);
    INFO("dim " << dim);
    CHECK((fast - naive).cwiseAbs().maxCoeff() <= 1e-5f * (1.0f + naive.cwiseAbs().maxCoeff()));
    // The backward's dot products against a plain loop over the rows as floats.
    const MatF dy = pkmtest::random_matrix(70, dim, 10).cast<float>();
    MatF dw(70, 12);
    pkm::SparseRowGrad<float> g;
    pkm::embedding_bag_backward(table, idx, w, dy, dw, g);
    float worst = 0;
    for (Index b = 0; b < 70; ++b)
      for (Index l = 0; l < 12; ++l) {
        float ref = 0;
        for (Index d = 0; d < dim; ++d)
          ref += dy(b, d) * static_cast<float>(table.row(idx(b, l))[d]);
        worst = std::max(worst, std::abs(ref - dw(b, l)));
      }
    CHECK(worst <= 1e-4f);
  }
}

TEST_CASE("the gather agrees with the naive loop: fp32 table", "[embedding_bag]") {
  check_gather_against_naive<float>();
}
TEST_CASE("the gather agrees with the naive loop: bf16 table", "[embedding_bag]") {
  check_gather_against_naive<pkm::bf16>();
}
TEST_CASE("the gather agrees with the naive loop: fp16 table", "[embedding_bag]") {
  check_gather_against_naive<pkm::fp16>();
}

TEST_CASE("a layer reads a bf16 table as the float reference of the same values",
          "[embedding_bag][layer]") {
  auto c = pkmtest::small_config();
  c.v_dim = 70;  // blocks + remainder + tail
  pkm::MemoryLayer<float, pkm::bf16> half(c, 3);
  pkm::ValueTable<float> widened(c.slots(), c.v_dim);
  widened.matrix() = half.values().matrix().cast<float>();
  pkm::MemoryLayer<float> full(half.params(), std::move(widened));
  const MatF x = pkmtest::random_matrix(20, c.input_dim, 4).cast<float>();
  pkm::ForwardCache<float> c1, c2;
  const MatF a = half.forward(x, c1), b = full.forward(x, c2);
  CHECK(c1.indices == c2.indices);
  CHECK((a - b).cwiseAbs().maxCoeff() <= 1e-5f * (1.0f + b.cwiseAbs().maxCoeff()));
}

TEST_CASE("a strided view of the caller's table is read in place", "[embedding_bag]") {
  Mat big = pkmtest::random_matrix(10, 8, 1);
  auto table = pkm::ValueTable<double>::view(big.leftCols(5));  // stride 8, dim 5
  CHECK(table.data() == big.data());
  CHECK(table.stride() == 8);
  pkm::IndexMatrix idx(1, 2);
  idx << 3, 7;
  Mat w(1, 2);
  w << 0.5, -2.0;
  Mat out(1, 5);
  pkm::embedding_bag(table, idx, w, out);
  const Mat expect = 0.5 * big.row(3).head(5) - 2.0 * big.row(7).head(5);
  CHECK((out - expect).cwiseAbs().maxCoeff() < 1e-15);
}

TEST_CASE("the sparse table gradient equals a dense scatter, duplicates included",
          "[embedding_bag][backward]") {
  const Index rows = 40, dim = 6, B = 25, L = 8;
  pkm::ValueTable<double> table(rows, dim);
  pkm::init_values(table, 2);
  auto idx = random_indices(B, L, rows, 4);
  // Duplicates of one slot within a token and across tokens.
  idx(0, 1) = idx(0, 0);
  idx(0, 2) = idx(0, 0);
  idx(3, 5) = idx(0, 0);
  idx(7, 0) = 39;
  idx(8, 7) = 39;
  const Mat w = pkmtest::random_matrix(B, L, 5);
  const Mat dy = pkmtest::random_matrix(B, dim, 6);
  Mat dw(B, L);
  pkm::SparseRowGrad<double> g;
  pkm::embedding_bag_backward(table, idx, w, dy, dw, g);

  Mat dense = Mat::Zero(rows, dim);  // the reference: scatter-add every contribution
  for (Index b = 0; b < B; ++b)
    for (Index l = 0; l < L; ++l) dense.row(idx(b, l)) += w(b, l) * dy.row(b);
  Mat from_sparse = Mat::Zero(rows, dim);
  g.add_to(from_sparse);
  CHECK((from_sparse - dense).cwiseAbs().maxCoeff() < 1e-13);
  REQUIRE(std::is_sorted(g.rows.begin(), g.rows.end()));
  REQUIRE(std::adjacent_find(g.rows.begin(), g.rows.end()) == g.rows.end());
  std::vector<std::int64_t> touched(idx.data(), idx.data() + idx.size());
  std::sort(touched.begin(), touched.end());
  touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
  CHECK(g.rows == touched);  // exactly the touched rows, each once
  CHECK(g.values.rows() == g.size());

  for (Index b = 0; b < B; ++b)
    for (Index l = 0; l < L; ++l)
      CHECK(dw(b, l) == Approx(dy.row(b).dot(table.matrix().row(idx(b, l)))).epsilon(1e-12));

  // A second backward merges (adds) into the same sparse gradient.
  pkm::embedding_bag_backward(table, idx, w, dy, dw, g);
  Mat twice = Mat::Zero(rows, dim);
  g.add_to(twice);
  CHECK((twice - 2 * dense).cwiseAbs().maxCoeff() < 1e-13);
}

TEST_CASE("sparse gradients merge as a sum", "[sparse_grad]") {
  pkm::SparseRowGrad<double> a, b;
  a.dim = b.dim = 2;
  a.rows = {1, 4, 9};
  a.values = Mat::Ones(3, 2);
  b.rows = {0, 4, 10};
  b.values = 2 * Mat::Ones(3, 2);
  a.merge(b);
  CHECK(a.rows == std::vector<std::int64_t>{0, 1, 4, 9, 10});
  Mat expect(5, 2);
  expect << 2, 2, 1, 1, 3, 3, 1, 1, 2, 2;
  CHECK(a.values == expect);
  pkm::SparseRowGrad<double> wrong;
  wrong.dim = 3;
  wrong.rows = {0};
  wrong.values = Mat::Ones(1, 3);
  CHECK_THROWS_AS(a.merge(wrong), std::invalid_argument);
  Mat small = Mat::Zero(5, 2);
  CHECK_THROWS_AS(a.add_to(small), std::out_of_range);  // row 9 and 10 do not exist
}

TEST_CASE("the gather rejects bad indices and shapes without reading out of bounds",
          "[embedding_bag][errors]") {
  pkm::ValueTable<float> table(10, 4);
  pkm::IndexMatrix idx = pkm::IndexMatrix::Zero(2, 3);
  MatF w = MatF::Ones(2, 3), out(2, 4);
  idx(1, 2) = 10;
  CHECK_THROWS_WITH(pkm::embedding_bag(table, idx, w, out),
                    Catch::Contains("indices(1, 2) = 10") && Catch::Contains("0 <= index < 10"));
  CHECK_THROWS_AS(pkm::embedding_bag_naive(table, idx, w, out), std::out_of_range);
  idx(1, 2) = -1;
  CHECK_THROWS_AS(pkm::embedding_bag(table, idx, w, out), std::out_of_range);
  idx(1, 2) = 0;
  MatF wrong_w = MatF::Ones(2, 2), wrong_out(3, 4);
  CHECK_THROWS_WITH(pkm::embedding_bag(table, idx, wrong_w, out), Catch::Contains("weights"));
  CHECK_THROWS_WITH(pkm::embedding_bag(table, idx, w, wrong_out), Catch::Contains("out is 3 x 4"));
  MatF dw(2, 3);
  pkm::SparseRowGrad<float> g;
  idx(0, 0) = 12;
  CHECK_THROWS_AS(pkm::embedding_bag_backward(table, idx, w, out, dw, g), std::out_of_range);
  CHECK(g.empty());
  CHECK_THROWS_AS(pkm::ValueTable<float>(0, 4), std::invalid_argument);
  CHECK_THROWS_AS(pkm::ValueTable<float>::view(nullptr, 4, 4), std::invalid_argument);
}

TEST_CASE("grouping by row is a stable sort, in one pass or several", "[sparse_grad]") {
  // Row counts that take one radix pass (< 2^11), two and three; contributions keep their
  // order within a row, as std::stable_sort keeps it.
  std::mt19937_64 rng(21);
  for (std::int64_t row_count :
       {std::int64_t(1), std::int64_t(1000), std::int64_t(1) << 20, std::int64_t(5) << 28}) {
    std::uniform_int_distribution<std::int64_t> pick(0, row_count - 1);
    std::vector<pkm::detail::RowContribution<float>> items(3000);
    for (std::size_t t = 0; t < items.size(); ++t) {
      // Few distinct rows so that many share one; the source records the original position.
      items[t] = {pick(rng) % std::max<std::int64_t>(1, row_count / 997) * 997 % row_count,
                  std::int64_t(t), float(t)};
    }
    auto expected = items;
    std::stable_sort(expected.begin(), expected.end(),
                     [](const auto& a, const auto& b) { return a.row < b.row; });
    pkm::detail::GroupScratch<float> scratch;
    pkm::detail::RowSegments seg;
    pkm::detail::group_by_row(items, row_count, scratch, seg);
    INFO("row_count " << row_count);
    bool same = items.size() == expected.size();
    for (std::size_t t = 0; same && t < items.size(); ++t)
      same = items[t].row == expected[t].row && items[t].source == expected[t].source;
    CHECK(same);
    REQUIRE(seg.starts.size() == seg.rows.size() + 1);
    bool segments_ok = seg.starts.front() == 0 && seg.starts.back() == items.size();
    for (std::size_t u = 0; u < seg.rows.size(); ++u) {
      segments_ok = segments_ok && (u == 0 || seg.rows[u - 1] < seg.rows[u]);
      for (std::size_t t = seg.starts[u]; t < seg.starts[u + 1]; ++t)
        segments_ok = segments_ok && items[t].row == seg.rows[u];
    }
    CHECK(segments_ok);
  }
}

TEST_CASE("sqrt_array gives std::sqrt's bits at every position", "[sparse_grad]") {
  std::mt19937_64 rng(22);
  std::uniform_real_distribution<double> u(0.0, 1e6);
  for (int n : {0, 1, 3, 4, 7, 8, 15, 16, 17, 33, 100}) {
    std::vector<float> f(static_cast<std::size_t>(n)), fo(static_cast<std::size_t>(n));
    std::vector<double> d(static_cast<std::size_t>(n)), dout(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) {
      d[std::size_t(i)] = u(rng) * (i % 5 == 0 ? 1e-30 : 1.0);  // tiny and zero-ish values too
      f[std::size_t(i)] = float(d[std::size_t(i)]);
    }
    pkm::detail::sqrt_array(f.data(), fo.data(), n);
    pkm::detail::sqrt_array(d.data(), dout.data(), n);
    bool same = true;
    for (int i = 0; i < n; ++i) {
      const float wf = std::sqrt(f[std::size_t(i)]);
      const double wd = std::sqrt(d[std::size_t(i)]);
      same = same && std::memcmp(&wf, &fo[std::size_t(i)], 4) == 0 &&
             std::memcmp(&wd, &dout[std::size_t(i)], 8) == 0;
    }
    INFO("n " << n);
    CHECK(same);
  }
}
