// The GEMM engine (pkm/gemm.hpp) against a double-precision triple loop, on every backend
// compiled in; its same-bits promise across thread counts; its argument checks; and the whole
// layer at sizes where the products span many tiles and the search several chunks.
#include <catch2/catch.hpp>

#include <cstdint>

#include <cmath>
#include <limits>
#include <vector>

#include <omp.h>

#include <pkm/pkm.hpp>

#include "support.hpp"

using pkm::Index;
using MatF = pkm::RowMatrix<float>;
using pkmtest::same_bits;

namespace {

std::vector<pkm::GemmBackend> backends() {
  std::vector<pkm::GemmBackend> v;
  for (auto b : {pkm::GemmBackend::eigen, pkm::GemmBackend::blis, pkm::GemmBackend::openblas})
    if (pkm::gemm_backend_available(b)) v.push_back(b);
  return v;
}

/// Row-major storage with a leading dimension larger than the row, padding set to NaN so a
/// read outside the logical matrix shows up in the result.
template <class S>
struct Strided {
  Index rows, cols, ld;
  std::vector<S> data;
  Strided(Index r, Index c, Index pad, std::uint64_t seed) : rows(r), cols(c), ld(c + pad) {
    data.assign(std::size_t(std::max<Index>(1, r * ld)), std::numeric_limits<S>::quiet_NaN());
    const auto m = pkmtest::random_matrix(r, c, seed);
    for (Index i = 0; i < r; ++i)
      for (Index j = 0; j < c; ++j) data[std::size_t(i * ld + j)] = static_cast<S>(m(i, j));
  }
  S at(Index i, Index j) const { return data[std::size_t(i * ld + j)]; }
};

/// C = alpha op(A) op(B) + beta C0 in double, as the reference.
template <class S>
pkmtest::Mat reference(bool ta, bool tb, Index m, Index n, Index k, double alpha,
                       const Strided<S>& a, const Strided<S>& b, double beta,
                       const Strided<S>& c0) {
  pkmtest::Mat c(m, n);
  for (Index i = 0; i < m; ++i)
    for (Index j = 0; j < n; ++j) {
      double s = 0;
      for (Index p = 0; p < k; ++p)
        s += double(ta ? a.at(p, i) : a.at(i, p)) * double(tb ? b.at(j, p) : b.at(p, j));
      c(i, j) = alpha * s + (beta == 0 ? 0.0 : beta * double(c0.at(i, j)));
    }
  return c;
}

template <class S>
void check_products(pkm::GemmBackend backend) {
  const double tol = std::is_same_v<S, float> ? 2e-5 : 1e-12;
  struct Case {
    Index m, n, k;
  };
  for (const Case& s :
       {Case{1, 1, 1}, Case{7, 5, 3}, Case{600, 700, 50}, Case{513, 257, 130}, Case{33, 1, 64}}) {
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb)
        for (double beta : {0.0, 1.0, 0.5}) {
          INFO(pkm::gemm_backend_name(backend) << " m " << s.m << " n " << s.n << " k " << s.k
                                               << " ta " << ta << " tb " << tb << " beta " << beta);
          const Strided<S> a(ta ? s.k : s.m, ta ? s.m : s.k, 3, 1),
              b(tb ? s.n : s.k, tb ? s.k : s.n, 2, 2);
          Strided<S> c(s.m, s.n, 5, 3);
          if (beta == 0) {  // C must not be read: fill the logical part with NaN too
            for (Index i = 0; i < s.m; ++i)
              for (Index j = 0; j < s.n; ++j)
                c.data[std::size_t(i * c.ld + j)] = std::numeric_limits<S>::quiet_NaN();
          }
          const Strided<S> c0 = c;
          const auto want = reference(ta, tb, s.m, s.n, s.k, 0.75, a, b, beta, c0);
          pkm::gemm<S>(ta, tb, s.m, s.n, s.k, S(0.75), a.data.data(), a.ld, b.data.data(), b.ld,
                       S(beta), c.data.data(), c.ld, backend);
          double err = 0;
          for (Index i = 0; i < s.m; ++i)
            for (Index j = 0; j < s.n; ++j)
              err = std::max(
                  err, std::abs(double(c.at(i, j)) - want(i, j)) / (1.0 + std::abs(want(i, j))));
          CHECK(err < tol);
          // The padding between rows is never written.
          bool padding_untouched = true;
          for (Index i = 0; i < s.m; ++i)
            for (Index j = s.n; j < c.ld; ++j) padding_untouched &= std::isnan(c.at(i, j));
          CHECK(padding_untouched);
        }
  }
}

}  // namespace

TEST_CASE("gemm matches a double-precision reference on every backend, transposes and strides",
          "[gemm]") {
  INFO("default backend here: " << pkm::gemm_backend_name(pkm::gemm_backend()));
  for (auto b : backends()) {
    check_products<float>(b);
    check_products<double>(b);
  }
}

namespace {
/// A (m x k) times B^T (n x k) on every deterministic backend must give the same bits with 1 and
/// 2 threads and, when `nested`, from inside the caller's parallel region.
void check_same_bits_across_threads(Index m, Index n, Index k, std::uint64_t seed, bool nested) {
  const MatF a = pkmtest::random_matrix(m, k, seed).cast<float>(),
             b = pkmtest::random_matrix(n, k, seed + 1).cast<float>();
  const int saved = omp_get_max_threads();
  for (auto backend : backends()) {
    if (!pkm::gemm_backend_deterministic(backend)) continue;  // OpenBLAS makes no such promise
    INFO(pkm::gemm_backend_name(backend));
    auto product = [&](MatF& c) {
      pkm::gemm<float>(false, true, m, n, k, 1.0f, a.data(), k, b.data(), k, 0.0f, c.data(), n,
                       backend);
    };
    auto run = [&](int threads) {
      omp_set_num_threads(threads);
      MatF c(m, n);
      product(c);
      return c;
    };
    const MatF one = run(1), two = run(2);
    omp_set_num_threads(saved);
    CHECK(same_bits(one, two));
    if (!nested) continue;
    MatF inside(m, n);
#pragma omp parallel num_threads(2)
    {
#pragma omp single
      product(inside);
    }
    CHECK(same_bits(one, inside));
  }
}
}  // namespace

TEST_CASE("gemm gives the same bits with 1 and 2 threads and inside the caller's threads",
          "[gemm][threads]") {
  check_same_bits_across_threads(1100, 700, 300, 4, true);
}

TEST_CASE("a product of one tile gives the same bits with 1 and 2 threads", "[gemm][threads]") {
  // 512 x 256 is a single tile of the eigen backend; with k = 1024 it is big enough that Eigen
  // would thread it itself (and block it by thread count) if called outside a parallel region.
  check_same_bits_across_threads(512, 256, 1024, 6, false);
}

TEST_CASE("gemm refuses bad sizes, strides, pointers and missing backends", "[gemm][errors]") {
  std::vector<float> a(16, 1.0f), b(16, 1.0f), c(16, 0.0f);
  using Catch::Contains;
  CHECK_THROWS_WITH(
      pkm::gemm<float>(false, false, -1, 2, 2, 1.f, a.data(), 2, b.data(), 2, 0.f, c.data(), 2),
      Contains("m = -1"));
  CHECK_THROWS_WITH(
      pkm::gemm<float>(false, false, 2, 2, 4, 1.f, a.data(), 3, b.data(), 2, 0.f, c.data(), 2),
      Contains("lda = 3"));
  CHECK_THROWS_WITH(
      pkm::gemm<float>(false, true, 2, 2, 4, 1.f, a.data(), 4, b.data(), 2, 0.f, c.data(), 2),
      Contains("ldb = 2"));
  CHECK_THROWS_WITH(
      pkm::gemm<float>(false, false, 2, 3, 2, 1.f, a.data(), 2, b.data(), 3, 0.f, c.data(), 2),
      Contains("ldc = 2"));
  CHECK_THROWS_WITH(
      pkm::gemm<float>(false, false, 2, 2, 2, 1.f, nullptr, 2, b.data(), 2, 0.f, c.data(), 2),
      Contains("null"));
  CHECK(c == std::vector<float>(16, 0.0f));  // nothing written by a refused call
  for (auto backend : {pkm::GemmBackend::blis, pkm::GemmBackend::openblas}) {
    if (pkm::gemm_backend_available(backend)) continue;
    CHECK_THROWS_WITH(pkm::gemm<float>(false, false, 2, 2, 2, 1.f, a.data(), 2, b.data(), 2, 0.f,
                                       c.data(), 2, backend),
                      Contains("not compiled in"));
  }
  if (pkm::gemm_backend_available(pkm::GemmBackend::openblas)) {  // 32-bit ints in its API
    CHECK_THROWS_WITH(pkm::gemm<float>(false, false, 2, 2, 2, 1.f, a.data(), Index(1) << 31,
                                       b.data(), 2, 0.f, c.data(), 2, pkm::GemmBackend::openblas),
                      Contains("above 2^31 - 1"));
  }
  // Empty products: k = 0 scales C by beta; m = 0 or n = 0 touch nothing.
  std::vector<float> d = {1, 2, 3, 4};
  pkm::gemm<float>(false, false, 2, 2, 0, 1.f, nullptr, 1, nullptr, 2, 0.5f, d.data(), 2);
  CHECK(d == std::vector<float>{0.5f, 1.f, 1.5f, 2.f});
  pkm::gemm<float>(false, false, 0, 2, 3, 1.f, nullptr, 3, nullptr, 2, 0.f, nullptr, 2);
}

TEMPLATE_TEST_CASE(
    "a layer gives the same bits with 1 and 2 threads at sizes that span many GEMM tiles",
    "[layer][threads][gemm]", float, pkm::bf16) {
  pkm::MemoryConfig c;
  c.input_dim = 300;
  c.heads = 2;
  c.n_keys = 40;
  c.k_dim = 64;
  c.knn = 6;
  c.v_dim = 520;
  c.output_dim = 270;
  c.gating = true;
  c.qk_norm = true;
  const Index B = 1100;  // two search chunks, several tiles, not a multiple of 64
  pkm::MemoryLayer<float, TestType> layer(c, pkm::ValueTable<TestType>(c.slots(), c.v_dim), 61);
  pkm::init_values(layer.values(), 61);
  const MatF x = pkmtest::random_matrix(B, c.input_dim, 62).cast<float>();
  const MatF dout = pkmtest::random_matrix(B, c.output_dim, 63).cast<float>();
  struct Run {
    MatF out, dx;
    pkm::LayerGradients<float> g;
    pkm::IndexMatrix idx;
  };
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    Run r{MatF(), MatF(B, c.input_dim), pkm::LayerGradients<float>(c), {}};
    pkm::ForwardCache<float> cache;
    r.out = layer.forward(x, cache);
    r.idx = cache.indices;
    layer.backward(x, cache, dout, r.g, r.dx);
    return r;
  };
  const int saved = omp_get_max_threads();
  const Run one = run(1), two = run(2);
  omp_set_num_threads(saved);
  CHECK(one.idx == two.idx);
  CHECK(same_bits(one.out, two.out));
  CHECK(same_bits(one.dx, two.dx));
  CHECK(pkmtest::first_gradient_difference(one.g, two.g) == "");
}

TEST_CASE("gemm: C overlapping A or B is refused, interleaved blocks of one buffer are not",
          "[gemm][errors]") {
  // C aliasing A gave errors of ~1 at 600 x 600.
  const Index n = 64;
  std::vector<float> buf(std::size_t(3 * n * n), 1.0f);
  float* a = buf.data();
  using Catch::Contains;
  for (auto backend : backends()) {
    INFO(pkm::gemm_backend_name(backend));
    CHECK_THROWS_WITH(
        pkm::gemm<float>(false, false, n, n, n, 1.f, a, n, a + n * n, n, 0.f, a, n, backend),
        Contains("C overlaps A"));
    CHECK_THROWS_WITH(pkm::gemm<float>(false, true, n, n, n, 1.f, a, n, a + n * n, n, 0.f,
                                       a + n * n + 5, n, backend),
                      Contains("C overlaps B"));
    // Shifted by one row, partly overlapping.
    CHECK_THROWS_WITH(pkm::gemm<float>(false, false, n, n, n, 1.f, a, n, a + 2 * n * n, n, 1.f,
                                       a + n, n, backend),
                      Contains("C overlaps A"));
    // One buffer of 3n columns: A = columns [0, n), B = [n, 2n), C = [2n, 3n) share no element.
    std::vector<float> wide(std::size_t(n * 3 * n));
    const auto ra = pkmtest::random_matrix(n, 3 * n, 9);
    for (std::size_t i = 0; i < wide.size(); ++i) wide[i] = float(ra.data()[i]);
    const std::vector<float> before = wide;
    CHECK_NOTHROW(pkm::gemm<float>(false, false, n, n, n, 1.f, wide.data(), 3 * n, wide.data() + n,
                                   3 * n, 0.f, wide.data() + 2 * n, 3 * n, backend));
    // ... and the product is right (A and B untouched).
    double err = 0;
    for (Index i = 0; i < n; ++i)
      for (Index j = 0; j < n; ++j) {
        double s = 0;
        for (Index p = 0; p < n; ++p)
          s += double(before[std::size_t(i * 3 * n + p)]) * before[std::size_t(p * 3 * n + n + j)];
        err = std::max(err, std::abs(s - wide[std::size_t(i * 3 * n + 2 * n + j)]));
      }
    CHECK(err < 1e-4);
    // The last column of C's block one column into A's next row: [n, 2n) against [2n - 1, ...)
    // with C starting inside A's span wraps onto A's next row.
    CHECK_THROWS_WITH(
        pkm::gemm<float>(false, false, n - 1, n, n, 1.f, wide.data(), 3 * n, wide.data() + n, 3 * n,
                         0.f, wide.data() + 3 * n - 1, 3 * n, backend),
        Contains("overlaps"));
    // A and B may share elements (A^T A).
    std::vector<float> out(std::size_t(n * n));
    CHECK_NOTHROW(
        pkm::gemm<float>(true, false, n, n, n, 1.f, a, n, a, n, 0.f, out.data(), n, backend));
  }
}

TEST_CASE("gemm: alpha = 0 reads neither A nor B, the same on every backend", "[gemm]") {
  // NaN in A with alpha = 0 and beta = 1 gave NaN on the eigen backend and none on blis.
  const Index m = 9, n = 7, k = 5;
  std::vector<double> a(std::size_t(m * k), std::numeric_limits<double>::quiet_NaN()),
      b(std::size_t(k * n), 1.0);
  for (auto backend : backends()) {
    INFO(pkm::gemm_backend_name(backend));
    for (double beta : {1.0, 0.5, 0.0}) {
      std::vector<double> c(std::size_t(m * n), 3.0);
      pkm::gemm<double>(false, false, m, n, k, 0.0, a.data(), k, b.data(), n, beta, c.data(), n,
                        backend);
      CHECK(c == std::vector<double>(std::size_t(m * n), 3.0 * beta));
    }
    // alpha = 0 may even alias (nothing is read): C = beta C.
    std::vector<double> c(std::size_t(m * n), 2.0);
    pkm::gemm<double>(false, false, m, n, n, 0.0, c.data(), n, c.data(), n, 0.5, c.data(), n,
                      backend);
    CHECK(c == std::vector<double>(std::size_t(m * n), 1.0));
  }
}

TEST_CASE("gemm: leading dimensions whose extent wraps are refused", "[gemm][errors]") {
  std::vector<float> a(16, 1.0f), b(16, 1.0f), c(16, 0.0f);
  using Catch::Contains;
  const Index huge = Index(1) << 62;
  CHECK_THROWS_WITH(
      pkm::gemm<float>(false, false, 2, 2, 2, 1.f, a.data(), huge, b.data(), 2, 0.f, c.data(), 2),
      Contains("A's extent"));
  CHECK_THROWS_WITH(
      pkm::gemm<float>(false, false, 2, 2, 2, 1.f, a.data(), 2, b.data(), huge, 0.f, c.data(), 2),
      Contains("B's extent"));
  CHECK_THROWS_WITH(
      pkm::gemm<float>(false, false, 2, 2, 2, 1.f, a.data(), 2, b.data(), 2, 0.f, c.data(), huge),
      Contains("C's extent"));
  // An extent that fits 2^62 bytes but runs past the end of the address space.
  const auto* top = reinterpret_cast<const float*>(std::uintptr_t(0) - 64);
  CHECK_THROWS_WITH(
      pkm::gemm<float>(false, false, 2, 2, 2, 1.f, top, 1 << 20, b.data(), 2, 0.f, c.data(), 2),
      Contains("wraps around the address space"));
  CHECK(c == std::vector<float>(16, 0.0f));
}

TEST_CASE("PKM_GEMM_BACKEND overrides the backend, and a name not compiled in or unknown is refused",
          "[gemm][errors]") {
  struct Env {
    explicit Env(const char* v) { setenv("PKM_GEMM_BACKEND", v, 1); }
    ~Env() { unsetenv("PKM_GEMM_BACKEND"); }
  };
  const pkm::GemmBackend chosen = pkm::gemm_backend();
  CHECK(pkm::gemm_backend_available(chosen));
  {
    Env env("eigen");
    CHECK(pkm::gemm_backend() == pkm::GemmBackend::eigen);
  }
  for (pkm::GemmBackend b : {pkm::GemmBackend::blis, pkm::GemmBackend::openblas}) {
    Env env(pkm::gemm_backend_name(b));
    if (pkm::gemm_backend_available(b))
      CHECK(pkm::gemm_backend() == b);
    else
      CHECK_THROWS_WITH(pkm::gemm_backend(), Catch::Contains("was not compiled in"));
  }
  {
    Env env("mkl");
    CHECK_THROWS_WITH(pkm::gemm_backend(),
                      Catch::Contains("PKM_GEMM_BACKEND = 'mkl' is not a backend; expected eigen, "
                                      "blis or openblas"));
  }
  CHECK(pkm::gemm_backend() == chosen);
}
