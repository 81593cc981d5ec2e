// pkm/key_search.hpp on its own: per head, the selection equals a brute-force search over all
// n^2 slots of the half-score sums (with and without qk-norm), the weights are their softmax,
// and the backward (dq and the sub-keys' gradient) matches central finite differences of
// sum(dw * weights) where the selection does not change under the perturbation.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <pkm/key_search.hpp>

#include "support.hpp"

using pkm::Index;
using pkmtest::Mat;
using pkmtest::random_matrix;

namespace {

/// Head h of token b: the k best slots of all n^2 by the library's total order, their scores
/// and softmax weights, from the formulas.
struct Best {
  std::vector<Index> slots;
  std::vector<double> scores, weights;
};
Best brute_force(const pkm::MemoryConfig& c, const Mat& keys, const Mat& q, Index b, Index h) {
  const Index n = c.n_keys, half = c.half();
  const double tau = c.effective_qk_norm_scale();
  std::vector<double> s[2];
  for (Index t = 0; t < 2; ++t) {
    const double* qh = q.row(b).data() + h * c.k_dim + t * half;
    double qn = 0;
    for (Index d = 0; d < half; ++d) qn += qh[d] * qh[d];
    for (Index i = 0; i < n; ++i) {
      const Index row = (2 * h + t) * n + i;
      double dot = 0, kk = 0;
      for (Index d = 0; d < half; ++d)
        dot += qh[d] * keys(row, d), kk += keys(row, d) * keys(row, d);
      s[t].push_back(c.qk_norm ? tau * dot / (std::sqrt(qn + 1e-6) * std::sqrt(kk + 1e-6)) : dot);
    }
  }
  std::vector<std::tuple<double, double, Index, double, Index>> all;
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < n; ++j) all.emplace_back(-(s[0][i] + s[1][j]), -s[0][i], i, -s[1][j], j);
  std::sort(all.begin(), all.end());
  Best r;
  double z = 0;
  for (Index m = 0; m < c.knn; ++m) z += std::exp(-std::get<0>(all[m]) + std::get<0>(all[0]));
  for (Index m = 0; m < c.knn; ++m) {
    r.slots.push_back(std::get<2>(all[m]) * n + std::get<4>(all[m]));
    r.scores.push_back(-std::get<0>(all[m]));
    r.weights.push_back(c.score_activation == pkm::ScoreActivation::relu
                            ? std::max(0.0, r.scores.back())
                            : std::exp(-std::get<0>(all[m]) + std::get<0>(all[0])) / z);
  }
  return r;
}

/// Every token's and head's indices, scores and weights in `cache` against brute_force.
void check_against_brute_force(const pkm::MemoryConfig& c, const Mat& keys, const Mat& q,
                               const pkm::KeySearchCache<double>& cache) {
  for (Index b = 0; b < q.rows(); ++b) {
    for (Index h = 0; h < c.heads; ++h) {
      const Best want = brute_force(c, keys, q, b, h);
      for (Index m = 0; m < c.knn; ++m) {
        CHECK(cache.indices(b, h * c.knn + m) == want.slots[std::size_t(m)]);
        CHECK(cache.scores(b, h * c.knn + m) == Approx(want.scores[std::size_t(m)]).epsilon(1e-12));
        CHECK(cache.weights(b, h * c.knn + m) ==
              Approx(want.weights[std::size_t(m)]).epsilon(1e-12));
      }
    }
  }
}

}  // namespace

TEST_CASE(
    "key search: exact top-k of all slots, softmax weights, and gradients by finite differences",
    "[key_search]") {
  for (const auto& [qk_norm, relu] : {std::pair{false, false}, std::pair{true, false},
                                      std::pair{false, true}, std::pair{true, true}}) {
    INFO("qk_norm " << qk_norm << ", relu " << relu);
    pkm::MemoryConfig c = pkmtest::small_config();
    c.score_activation = relu ? pkm::ScoreActivation::relu : pkm::ScoreActivation::softmax;
    c.heads = 2;
    c.n_keys = 7;
    c.k_dim = 6;
    c.knn = 4;
    c.qk_norm = qk_norm;
    const Index B = 9;
    Mat keys = random_matrix(2 * c.heads * c.n_keys, c.half(), 11);
    Mat q = random_matrix(B, c.heads * c.k_dim, 12);
    pkm::KeySearchCache<double> cache;
    pkm::KeySearchWorkspace<double> ws;
    pkm::key_search_forward<double>(c, keys, q, cache, ws);
    check_against_brute_force(c, keys, q, cache);
    // Backward of L = sum(dw * weights).
    const Mat dw = random_matrix(B, c.bag_size(), 13);
    Mat dscore = dw, dq(B, c.heads * c.k_dim);
    Mat dkeys = Mat::Zero(keys.rows(), keys.cols());
    pkm::key_search_backward<double>(c, keys, q, cache, dscore, dq, dkeys, ws);
    const pkm::IndexMatrix selection = cache.indices;
    auto loss = [&](bool* same) {
      pkm::KeySearchCache<double> k2;
      pkm::KeySearchWorkspace<double> w2;
      pkm::key_search_forward<double>(c, keys, q, k2, w2);
      if (same) *same = k2.indices == selection;
      return (k2.weights.array() * dw.array()).sum();
    };
    std::vector<std::string> fails;
    const auto sq =
        pkmtest::check_fd(q.data(), q.size(), std::vector<double>(dq.data(), dq.data() + dq.size()),
                          loss, fails, "dq");
    const auto sk = pkmtest::check_fd(
        keys.data(), keys.size(), std::vector<double>(dkeys.data(), dkeys.data() + dkeys.size()),
        loss, fails, "dkeys");
    CHECK(sq.checked > 20);
    CHECK(sk.checked > 20);
    for (const auto& f : fails) FAIL_CHECK(f);
  }
}

TEST_CASE("key search of a decoding batch (every head at once): brute force's top-k, and the "
          "bits of one product per head",
          "[key_search][small_batch]") {
  pkm::MemoryConfig c = pkmtest::small_config();
  c.heads = 3;
  c.n_keys = 70;  // column blocks of 64 and 6, groups of 4 and 2 left over
  c.k_dim = 10;
  c.knn = 4;
  for (bool qk_norm : {false, true}) {
    c.qk_norm = qk_norm;
    for (Index B : {1, 5, 8}) {
      INFO("qk_norm " << qk_norm << ", batch " << B);
      const Mat keys = random_matrix(2 * c.heads * c.n_keys, c.half(), 21);
      const Mat q = random_matrix(B, c.heads * c.k_dim, 22);
      pkm::KeySearchCache<double> cache;
      pkm::KeySearchWorkspace<double> ws;
      pkm::key_search_forward<double>(c, keys, q, cache, ws);
      check_against_brute_force(c, keys, q, cache);
      if (qk_norm) continue;
      // In float, the bits of the per-head path: each head's two half-score rows by
      // pkm::gemm (its small-batch kernel at this batch), then the top-k and softmax.
      using MatF = pkm::RowMatrix<float>;
      const MatF kf = keys.cast<float>(), qf = q.cast<float>();
      pkm::KeySearchCache<float> cf;
      pkm::KeySearchWorkspace<float> wf;
      pkm::key_search_forward<float>(c, kf, qf, cf, wf);
      const Index n = c.n_keys, half = c.half(), k = c.knn;
      MatF s(B, 2 * n);
      pkm::ProductKeyScratch<float> sc;
      for (Index h = 0; h < c.heads; ++h) {
        for (Index t = 0; t < 2; ++t) {
          pkm::gemm<float>(false, true, B, n, half, 1.0f, qf.data() + h * c.k_dim + t * half,
                           qf.cols(), kf.data() + (2 * h + t) * n * half, half, 0.0f,
                           s.data() + t * n, 2 * n);
        }
        for (Index b = 0; b < B; ++b) {
          std::vector<Index> idx(std::size_t(k), 0);
          std::vector<float> sco(static_cast<std::size_t>(k)), w(static_cast<std::size_t>(k));
          pkm::product_key_topk(s.row(b).data(), s.row(b).data() + n, n, k, idx.data(),
                                sco.data(), sc);
          pkm::softmax_forward(sco.data(), k, w.data());
          for (Index m = 0; m < k; ++m) {
            CHECK(cf.indices(b, h * k + m) == idx[std::size_t(m)]);
            CHECK(std::memcmp(&cf.scores(b, h * k + m), &sco[std::size_t(m)], 4) == 0);
            CHECK(std::memcmp(&cf.weights(b, h * k + m), &w[std::size_t(m)], 4) == 0);
          }
        }
      }
    }
  }
}

TEST_CASE("key_search_forward and key_search_backward refuse operands of other shapes, before "
          "writing anything",
          "[key_search][hostile]") {
  using Catch::Contains;
  pkm::MemoryConfig c = pkmtest::small_config();
  c.heads = 2;
  c.n_keys = 7;
  c.k_dim = 6;
  c.knn = 4;
  const Index B = 3;
  for (bool qk_norm : {false, true}) {
    INFO("qk_norm " << qk_norm);
    c.qk_norm = qk_norm;
    const Mat keys = random_matrix(2 * c.heads * c.n_keys, c.half(), 31);
    const Mat q = random_matrix(B, c.heads * c.k_dim, 32);
    pkm::KeySearchCache<double> cache;
    pkm::KeySearchWorkspace<double> ws;
    auto forward = [&](const pkm::MemoryConfig& cc, const pkm::ConstMatrixRef<double>& k,
                       const pkm::ConstMatrixRef<double>& qq) {
      pkm::key_search_forward<double>(cc, k, qq, cache, ws);
    };
    cache.indices = pkm::IndexMatrix::Constant(1, 1, -5);
    CHECK_THROWS_WITH(forward(c, keys.topRows(keys.rows() - 1), q),
                      Contains("pkm::key_search_forward: keys is 27 x 3, expected 28 x 3"));
    // Keys as a block of a wider matrix: the right shape, rows 5 values apart.
    const Mat wide = random_matrix(keys.rows(), 5, 33);
    CHECK_THROWS_WITH(forward(c, wide.leftCols(3), q),
                      Contains("the keys' rows are 5 values apart; expected contiguous rows"));
    CHECK_THROWS_WITH(forward(c, keys, q.leftCols(11)),
                      Contains("query has 11 columns, expected heads x k_dim = 12"));
    pkm::MemoryConfig bad = c;
    bad.knn = 50;  // more than n_keys^2
    CHECK_THROWS_AS(forward(bad, keys, q), std::invalid_argument);
    CHECK(cache.indices == pkm::IndexMatrix::Constant(1, 1, -5));  // nothing written

    forward(c, keys, q);
    const Mat dw = random_matrix(B, c.bag_size(), 34);
    Mat dscore = dw, dq = Mat::Constant(B, c.heads * c.k_dim, 7.0);
    Mat dkeys = Mat::Constant(keys.rows(), keys.cols(), 9.0);
    auto backward = [&](const pkm::KeySearchCache<double>& cc, pkm::MatrixRef<double> dqq,
                        pkm::MatrixRef<double> dk) {
      pkm::key_search_backward<double>(c, keys, q, cc, dscore, dqq, dk, ws);
    };
    auto untouched = [&] {
      return (dq.array() == 7.0).all() && (dkeys.array() == 9.0).all() && dscore == dw;
    };
    pkm::KeySearchCache<double> other = cache;
    other.indices(1, 2) = c.n_keys * c.n_keys;  // one past the last slot
    CHECK_THROWS_WITH(backward(other, dq, dkeys),
                      Contains("cache.indices(1, 2) = 49 is outside [0, n_keys^2 = 49)"));
    other = cache;
    other.indices(2, 0) = -1;
    CHECK_THROWS_WITH(backward(other, dq, dkeys), Contains("cache.indices(2, 0) = -1"));
    other = cache;
    other.weights.conservativeResize(B - 1, Eigen::NoChange);  // another batch's
    CHECK_THROWS_WITH(backward(other, dq, dkeys),
                      Contains("cache.weights is 2 x 8, expected 3 x 8"));
    if (qk_norm) {
      other = cache;
      other.key_inv_norm.resize(3);
      CHECK_THROWS_WITH(backward(other, dq, dkeys), Contains("cache.key_inv_norm is 3 x 1"));
    }
    Mat dq_short(B, 11), dkeys_short(keys.rows() - 2, keys.cols());
    CHECK_THROWS_WITH(backward(cache, dq_short, dkeys), Contains("dq is 3 x 11, expected 3 x 12"));
    CHECK_THROWS_WITH(backward(cache, dq, dkeys_short),
                      Contains("dkeys is 26 x 3, expected 28 x 3"));
    CHECK(untouched());
    backward(cache, dq, dkeys);  // the same operands, whole: accepted
    CHECK_FALSE(untouched());
  }
}
