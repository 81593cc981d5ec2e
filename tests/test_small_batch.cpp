// The small-batch forward (a decoding model's 1-8 tokens): the small-batch product kernel
// against plain loops, a token's bits alone and in a batch, at 1 and 2 threads and from
// concurrent callers; the parameters' finite check once per change, and what marks a change.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <thread>
#include <utility>
#include <vector>

#include <omp.h>

#include <pkm/detail/gemm_small.hpp>
#include <pkm/gemm.hpp>
#include <pkm/memory_layer.hpp>
#include <pkm/optim/adamw.hpp>

#include "support.hpp"

using Catch::Contains;
using pkm::Index;
using pkmtest::same_bits;
using pkmtest::ThreadCount;
using MatF = pkm::RowMatrix<float>;

namespace {

pkm::MemoryConfig small_batch_config() {
  pkm::MemoryConfig c;
  c.input_dim = 40;
  c.heads = 2;
  c.n_keys = 9;
  c.k_dim = 18;
  c.knn = 5;
  c.v_dim = 21;
  c.output_dim = 21;
  return c;
}

}  // namespace

TEST_CASE("the small-batch product equals the plain loop, with any alpha, beta and tail",
          "[gemm][small_batch]") {
  for (Index m : {1, 3, 8}) {
    for (Index k : {1, 15, 16, 37}) {
      for (Index n : {1, 4, 7, 130}) {
        for (float beta : {0.0f, 0.5f}) {
          INFO("m " << m << " n " << n << " k " << k << " beta " << beta);
          const MatF a = pkmtest::random_matrix(m, k + 2, 1).cast<float>();  // lda = k + 2
          const MatF b = pkmtest::random_matrix(n, k + 1, 2).cast<float>();  // ldb = k + 1
          MatF c = pkmtest::random_matrix(m, n + 3, 3).cast<float>();        // ldc = n + 3
          MatF expect = c;
          for (Index i = 0; i < m; ++i) {
            for (Index j = 0; j < n; ++j) {
              double dot = 0;
              for (Index p = 0; p < k; ++p) dot += double(a(i, p)) * double(b(j, p));
              expect(i, j) = float(1.5 * dot + (beta == 0 ? 0.0 : double(beta) * c(i, j)));
            }
          }
          if (beta == 0) c.leftCols(n).setConstant(std::nanf(""));  // not read
          pkm::detail::gemm_small_nt<float>(m, n, k, 1.5f, a.data(), k + 2, b.data(), k + 1, beta,
                                            c.data(), n + 3);
          for (Index i = 0; i < m; ++i) {
            for (Index j = 0; j < n; ++j)
              CHECK(c(i, j) == Approx(expect(i, j)).epsilon(1e-5).margin(1e-5));
            for (Index j = n; j < n + 3; ++j) CHECK(c(i, j) == c(i, j));  // padding untouched
          }
        }
      }
    }
  }
}

TEST_CASE("a token's output has the same bits alone, in a small batch and with 1 or 2 threads",
          "[layer][small_batch]") {
  const auto c = small_batch_config();
  const pkm::MemoryLayer<float> layer(c, 5);
  const MatF x = pkmtest::random_matrix(pkm::detail::kSmallGemmRows, c.input_dim, 6).cast<float>();
  MatF batch_out(x.rows(), c.output_dim);
  pkm::ForwardCache<float> cache;
  {
    ThreadCount one(1);
    layer.forward(x, batch_out, cache);
  }
  for (int threads : {1, 2}) {
    ThreadCount t(threads);
    MatF again(x.rows(), c.output_dim);
    layer.forward(x, again, cache);
    CHECK(same_bits(again, batch_out));
    for (Index b = 0; b < x.rows(); ++b) {
      INFO("token " << b << ", " << threads << " threads");
      MatF one(1, c.output_dim);
      layer.forward(x.middleRows(b, 1), one, cache);
      CHECK(same_bits(one, batch_out.middleRows(b, 1)));
    }
  }
}

TEST_CASE("concurrent callers, each with its own cache, get the serial results",
          "[layer][small_batch][threads]") {
  const auto c = small_batch_config();
  const pkm::MemoryLayer<float> layer(c, 7);
  const MatF x = pkmtest::random_matrix(6, c.input_dim, 8).cast<float>();
  std::vector<MatF> serial(x.rows(), MatF(1, c.output_dim));
  pkm::ForwardCache<float> cache;
  for (Index b = 0; b < x.rows(); ++b) layer.forward(x.middleRows(b, 1), serial[b], cache);
  std::vector<std::vector<MatF>> got(4, std::vector<MatF>(x.rows(), MatF(1, c.output_dim)));
  std::vector<std::thread> callers;
  for (int t = 0; t < 4; ++t) {
    callers.emplace_back([&, t] {
      pkm::ForwardCache<float> own;
      for (int round = 0; round < 20; ++round)
        for (Index b = 0; b < x.rows(); ++b) layer.forward(x.middleRows(b, 1), got[t][b], own);
    });
  }
  for (auto& th : callers) th.join();
  for (int t = 0; t < 4; ++t)
    for (Index b = 0; b < x.rows(); ++b) CHECK(same_bits(got[t][b], serial[b]));
}

TEST_CASE("the parameters are checked once per change, and every non-const access is a change",
          "[layer][small_batch][parameters]") {
  const auto c = small_batch_config();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const MatF x = pkmtest::random_matrix(2, c.input_dim, 9).cast<float>();
  MatF out(2, c.output_dim);
  pkm::ForwardCache<float> cache;
  pkm::MemoryLayer<float> layer(c, 10);
  const auto& params = std::as_const(layer).params();
  CHECK_FALSE(params.checked_finite());  // new parameters: not yet checked
  layer.forward(x, out, cache);
  CHECK(params.checked_finite());
  const auto version = params.modification_count();
  layer.forward(x, out, cache);
  CHECK(params.modification_count() == version);  // a forward changes nothing

  SECTION("a write through an accessor is seen") {
    layer.params().swilu_bias()[3] = nan;
    CHECK_FALSE(params.checked_finite());
    CHECK_THROWS_WITH(layer.forward(x, out, cache),
                      Contains("parameter 'swilu_projection.bias' holds nan at element 3"));
    CHECK_FALSE(params.checked_finite());  // a failed check records nothing: refused again
    CHECK_THROWS_WITH(layer.forward(x, out, cache), Contains("swilu_projection.bias"));
    layer.params().swilu_bias()[3] = 0.5f;
    CHECK_NOTHROW(layer.forward(x, out, cache));
  }
  SECTION(
      "a write through a pointer kept from before: still refused, precisely after "
      "mark_modified()") {
    float* keys = layer.params().data(pkm::Tensor::keys);
    layer.forward(x, out, cache);  // checked after the pointer was taken
    keys[0] = nan;
    // Unseen by the stamp, the NaN still makes every score of head 0 non-finite.
    CHECK_THROWS_WITH(layer.forward(x, out, cache), Contains("sub-keys hold non-finite values"));
    layer.params().mark_modified();
    CHECK_THROWS_WITH(layer.forward(x, out, cache),
                      Contains("parameter 'keys' holds nan at element 0"));
  }
  SECTION("an optimizer step is a change") {
    pkm::LayerGradients<float> grads(c);
    layer.backward(x, cache, MatF::Constant(2, c.output_dim, 1.0f), grads);
    pkm::optim::AdamW<float> opt;
    opt.add("mem.", layer.params(), grads.params);
    layer.forward(x, out, cache);
    REQUIRE(params.checked_finite());
    const auto before = params.modification_count();
    opt.step();  // writes through the pointers add() kept
    CHECK(params.modification_count() != before);
    CHECK_FALSE(params.checked_finite());
  }
  SECTION("a copy starts unchecked and has its own stamp") {
    pkm::MemoryLayer<float> copy = layer;
    CHECK_FALSE(std::as_const(copy).params().checked_finite());
    CHECK(params.checked_finite());
  }
}
