// bf16 products (pkm/gemm_bf16.hpp) and the layer computing in bf16 (MemoryConfig::compute):
// the rounding against Eigen's bfloat16, every kernel against a double-precision product of
// the rounded operands with a proven error bound, the same bits at any thread count, and the
// bf16 layer against the fp32 layer, forward and backward.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <omp.h>

#include <pkm/gemm_bf16.hpp>
#include <pkm/io/checkpoint.hpp>
#include <pkm/memory_layer.hpp>
#include <pkm/product_keys_ref.hpp>

#include "support.hpp"

using Catch::Contains;
using pkm::Bf16Kernel;
using pkm::Index;
using pkmtest::same_bits;
using Threads = pkmtest::ThreadCount;
using MatF = pkm::RowMatrix<float>;

namespace {

using KernelEnv = pkmtest::Bf16KernelEnv;

double bf(float v) { return static_cast<double>(pkm::detail::round_bf16(v)); }

/// C = alpha op(A) op(B) + beta C checked element by element against the double product of
/// the bf16-rounded operands: any order of summing k exact products in fp32 stays within
/// (k + 2) u (|alpha| sum |a b| + |beta c|), u = 2^-24.
void check_against_reference(bool ta, bool tb, Index m, Index n, Index k, float alpha,
                             const MatF& A, const MatF& B, float beta, const MatF& C0,
                             const MatF& C) {
  const double u = std::ldexp(1.0, -24);
  for (Index i = 0; i < m; ++i) {
    for (Index j = 0; j < n; ++j) {
      double s = 0, mag = 0;
      for (Index p = 0; p < k; ++p) {
        const double x = bf(ta ? A(p, i) : A(i, p)) * bf(tb ? B(j, p) : B(p, j));
        s += x;
        mag += std::abs(x);
      }
      const double c0 = beta == 0.0f ? 0.0 : double(beta) * C0(i, j);
      const double ref = double(alpha) * s + c0;
      const double bound = double(k + 2) * u * (std::abs(alpha) * mag + std::abs(c0)) + 1e-30;
      INFO("element (" << i << ", " << j << ") = " << C(i, j) << ", expected " << ref);
      REQUIRE(std::abs(C(i, j) - ref) <= bound);
    }
  }
}

}  // namespace

TEST_CASE("bf16 rounding is Eigen's round-to-nearest-even, NaN kept", "[gemm_bf16]") {
  std::mt19937 rng(5);
  std::vector<float> values = {0.0f,
                               -0.0f,
                               1.0f,
                               -1.5f,
                               1.00390625f,  // exactly halfway between two bf16: ties to even
                               1.01171875f,  // halfway, rounds up to even
                               3.3895314e38f,  // rounds to infinity
                               std::numeric_limits<float>::max(),
                               std::numeric_limits<float>::denorm_min(),
                               std::numeric_limits<float>::min(),
                               pkmtest::kInf,
                               -pkmtest::kInf};
  for (int i = 0; i < 100000; ++i) {
    std::uint32_t bits = rng();
    float f;
    std::memcpy(&f, &bits, sizeof f);
    if (!std::isnan(f)) values.push_back(f);
  }
  for (float v : values) {
    const Eigen::bfloat16 e(v);
    std::uint16_t expect;
    std::memcpy(&expect, &e, sizeof expect);
    INFO("value " << v);
    REQUIRE(pkm::detail::bf16_bits(v) == expect);
  }
  CHECK(std::isnan(pkm::detail::round_bf16(pkmtest::kNaN)));
  std::uint32_t nan_low_bits = 0x7f800001u;  // a NaN whose payload truncation would lose
  float snan;
  std::memcpy(&snan, &nan_low_bits, sizeof snan);
  CHECK(std::isnan(pkm::detail::round_bf16(snan)));
}

TEST_CASE("gemm_bf16 equals the double product of the rounded operands, every kernel and layout",
          "[gemm_bf16]") {
  struct Shape {
    Index m, n, k;
  };
  // Micro-tile edges (6 x 64), tile edges (192 x 256), odd k, k past one chunk (256), and the
  // small-batch path (m <= 8, A by rows, B by rows).
  const Shape shapes[] = {{1, 1, 1},   {2, 3, 1},    {7, 65, 13},  {8, 70, 33},
                          {9, 64, 2},  {13, 129, 300}, {200, 300, 257}, {6, 1, 600}};
  for (Bf16Kernel kernel : pkmtest::bf16_kernels_here()) {
    for (const Shape& s : shapes) {
      for (int ta = 0; ta < 2; ++ta) {
        for (int tb = 0; tb < 2; ++tb) {
          const float alpha = ta ? 1.0f : -0.75f, beta = tb ? 0.5f : 0.0f;
          INFO(pkm::bf16_kernel_name(kernel) << " m " << s.m << " n " << s.n << " k " << s.k
                                             << " ta " << ta << " tb " << tb);
          // Stored shapes, with one spare column each: leading dimensions above the minimum.
          const Index ar = ta ? s.k : s.m, ac = ta ? s.m : s.k;
          const Index br = tb ? s.n : s.k, bc = tb ? s.k : s.n;
          const MatF A = pkmtest::random_matrix(ar, ac + 1, 11, 3.0).cast<float>();
          const MatF B = pkmtest::random_matrix(br, bc + 1, 12).cast<float>();
          const MatF C0 = pkmtest::random_matrix(s.m, s.n + 1, 13).cast<float>();
          MatF C = C0;
          pkm::gemm_bf16(ta, tb, s.m, s.n, s.k, alpha, A.data(), ac + 1, B.data(), bc + 1, beta,
                         C.data(), s.n + 1, kernel);
          check_against_reference(ta, tb, s.m, s.n, s.k, alpha, A, B, beta, C0, C);
          CHECK(same_bits(C.col(s.n), C0.col(s.n)));  // the spare column is not written
        }
      }
    }
  }
}

TEST_CASE("gemm_bf16 gives the same bits with 1 and 2 threads, and inside the caller's team",
          "[gemm_bf16][threads]") {
  const Index m = 400, n = 520, k = 300;
  const MatF A = pkmtest::random_matrix(m, k, 21).cast<float>();
  const MatF B = pkmtest::random_matrix(n, k, 22).cast<float>();
  for (Bf16Kernel kernel : pkmtest::bf16_kernels_here()) {
    INFO(pkm::bf16_kernel_name(kernel));
    MatF one(m, n), two(m, n), nested(m, n);
    {
      Threads t(1);
      pkm::gemm_bf16(false, true, m, n, k, 1.0f, A.data(), k, B.data(), k, 0.0f, one.data(), n,
                     kernel);
    }
    {
      Threads t(2);
      pkm::gemm_bf16(false, true, m, n, k, 1.0f, A.data(), k, B.data(), k, 0.0f, two.data(), n,
                     kernel);
#pragma omp parallel num_threads(2)
      {
#pragma omp single
        pkm::gemm_bf16(false, true, m, n, k, 1.0f, A.data(), k, B.data(), k, 0.0f, nested.data(),
                       n, kernel);
      }
    }
    CHECK(same_bits(one, two));
    CHECK(same_bits(one, nested));
  }
}

TEST_CASE("gemm_bf16: NaN reaches its row and column, alpha == 0 reads nothing, bad arguments "
          "are refused",
          "[gemm_bf16][hostile]") {
  const Index m = 20, n = 70, k = 9;
  MatF A = pkmtest::random_matrix(m, k, 31).cast<float>();
  const MatF B = pkmtest::random_matrix(n, k, 32).cast<float>();
  A(3, 4) = pkmtest::kNaN;
  MatF C(m, n);
  pkm::gemm_bf16(false, true, m, n, k, 1.0f, A.data(), k, B.data(), k, 0.0f, C.data(), n);
  for (Index i = 0; i < m; ++i)
    for (Index j = 0; j < n; ++j) REQUIRE(std::isnan(C(i, j)) == (i == 3));
  C.setConstant(2.0f);
  pkm::gemm_bf16(false, true, m, n, k, 0.0f, A.data(), k, B.data(), k, 0.5f, C.data(), n);
  CHECK((C.array() == 1.0f).all());
  CHECK_THROWS_WITH(
      pkm::gemm_bf16(false, true, m, n, k, 1.0f, A.data(), k - 1, B.data(), k, 0.0f, C.data(), n),
      Contains("lda = 8 < 9"));
  CHECK_THROWS_WITH(pkm::gemm_bf16(false, true, m, k, k, 1.0f, A.data(), k, A.data(), k, 0.0f,
                                   A.data(), k),
                    Contains("C overlaps A"));
  CHECK((C.array() == 1.0f).all());  // refused calls wrote nothing
  if (!pkm::bf16_kernel_available(Bf16Kernel::avx512_bf16)) {
    CHECK_THROWS_WITH(pkm::gemm_bf16(false, true, m, n, k, 1.0f, A.data(), k, B.data(), k, 0.0f,
                                     C.data(), n, Bf16Kernel::avx512_bf16),
                      Contains("not available on this CPU"));
  }
  CHECK(pkm::bf16_products_here() == pkm::bf16_kernel_available(Bf16Kernel::avx512_bf16));
  KernelEnv env("portable");
  CHECK(pkm::bf16_kernel() == Bf16Kernel::portable);
  CHECK(pkm::bf16_products_here());  // the emulation, asked for
}

TEST_CASE("compute and score_compute = BF16: only float layers, their setters switch them and "
          "refuse the rest",
          "[gemm_bf16][layer][config]") {
  // compute and score_compute: the same rules, each through its field and its setter.
  using Field = pkm::Dtype pkm::MemoryConfig::*;
  const auto set = [](auto& params, Field field, pkm::Dtype d) {
    if (field == &pkm::MemoryConfig::compute)
      params.set_compute(d);
    else
      params.set_score_compute(d);
  };
  for (const auto& [name, field] :
       {std::pair<std::string, Field>("compute", &pkm::MemoryConfig::compute),
        std::pair<std::string, Field>("score_compute", &pkm::MemoryConfig::score_compute)}) {
    INFO(name);
    auto c = pkmtest::small_config();
    c.*field = pkm::Dtype::bf16;
    CHECK_NOTHROW(c.validate());
    CHECK_THROWS_WITH(pkm::LayerParameters<double>(c),
                      Contains(name + " = BF16 needs a float layer"));
    c.*field = pkm::Dtype::f16;
    CHECK_THROWS_WITH(c.validate(),
                      Contains(name + " = F16 is not supported; expected F32 or BF16"));
    c.*field = pkm::Dtype::f32;
    pkm::LayerParameters<double> pd(c);
    CHECK_THROWS_WITH(set(pd, field, pkm::Dtype::bf16), Contains("needs a float layer"));
    CHECK(pd.config().*field == pkm::Dtype::f32);
    pkm::LayerParameters<float> pf(c);
    CHECK_THROWS_WITH(set(pf, field, pkm::Dtype::i64),
                      Contains(name + " = I64 is not supported"));
    CHECK(pf.config().*field == pkm::Dtype::f32);
    set(pf, field, pkm::Dtype::bf16);
    CHECK(pf.config().*field == pkm::Dtype::bf16);
    CHECK(pf.config() != c);
  }
  // The linear op itself, called with another dtype or bf16 on double operands.
  const MatF x = MatF::Ones(3, 4), w = MatF::Ones(5, 4);
  MatF y = MatF::Zero(3, 5);
  CHECK_THROWS_WITH(pkm::linear_forward<float>(x, w, nullptr, y, pkm::Dtype::f16),
                    Contains("products in F16 are not supported; expected F32 or BF16"));
  CHECK((y.array() == 0.0f).all());
  using MatD = pkm::RowMatrix<double>;
  const MatD xd = MatD::Ones(3, 4), wd = MatD::Ones(5, 4);
  MatD yd = MatD::Zero(3, 5);
  CHECK_THROWS_WITH(pkm::linear_forward<double>(xd, wd, nullptr, yd, pkm::Dtype::bf16),
                    Contains("products in BF16 need float operands"));
}

TEST_CASE("the bf16 layer: close to the fp32 layer forward and backward, its top-k exact over "
          "its own query, the same bits at any thread count",
          "[gemm_bf16][layer]") {
  // Where the CPU lacks AVX512-BF16 the layer computes in fp32 unless the emulation is asked
  // for: ask, so the bf16 path is what is tested on every CPU.
  const pkmtest::Bf16ProductsHere here;
  REQUIRE(pkm::bf16_products_here());
  auto c = pkmtest::medium_config();
  c.input_dim = 96;  // products long enough for the packed kernel's k chunks and tiles
  const Index B = 260;
  pkm::MemoryLayer<float> fp32(c, 41), bf16(c, 41);
  bf16.params().set_compute(pkm::Dtype::bf16);
  const MatF x = pkmtest::random_matrix(B, c.input_dim, 42).cast<float>();
  MatF dout = pkmtest::random_matrix(B, c.output_dim, 43).cast<float>();
  MatF out32(B, c.output_dim), out16(B, c.output_dim);
  pkm::ForwardCache<float> cache32, cache16;
  fp32.forward(x, out32, cache32);
  bf16.forward(x, out16, cache16);
  auto rel = [](const auto& a, const auto& b) { return double((a - b).norm() / b.norm()); };
  // Queries: bf16 operands give ~2^-9 relative error per product.
  CHECK(rel(cache16.query, cache32.query) < 1e-2);
  CHECK(rel(out16, out32) > 0.0);  // the products did run in bf16
  // A slot at the edge of a head's top-k may swap with its neighbour when the query moves by
  // bf16's rounding, which changes that token's output by a whole row's share. Compared: the
  // tokens whose every head selected the same slots in both layers (most of them); the other
  // tokens get no output gradient below, so the gradients compare like for like.
  Index agree = 0;
  for (Index b = 0; b < B; ++b) {
    bool same = true;
    for (Index h = 0; h < c.heads; ++h) {
      std::vector<std::int64_t> s32(c.knn), s16(c.knn);
      for (Index j = 0; j < c.knn; ++j) {
        s32[j] = cache32.indices(b, h * c.knn + j);
        s16[j] = cache16.indices(b, h * c.knn + j);
      }
      std::sort(s32.begin(), s32.end());
      std::sort(s16.begin(), s16.end());
      same = same && s32 == s16;
    }
    if (same) {
      ++agree;
      INFO("token " << b);
      CHECK(rel(out16.row(b), out32.row(b)) < 2e-2);
    } else {
      dout.row(b).setZero();
    }
  }
  CHECK(agree >= B / 2);

  // The key search is exact over the bf16-computed query: each head's kept scores are the
  // knn best of all n_keys^2 sums, brute force in double.
  const Index n = c.n_keys, half = c.half(), kn = c.knn;
  const auto& keys = bf16.params().keys();
  for (Index b = 0; b < B; ++b) {
    for (Index h = 0; h < c.heads; ++h) {
      std::vector<double> s1(n), s2(n), all;
      for (Index i = 0; i < n; ++i) {
        double d1 = 0, d2 = 0;
        for (Index d = 0; d < half; ++d) {
          d1 += double(cache16.query(b, h * c.k_dim + d)) * keys((2 * h) * n + i, d);
          d2 += double(cache16.query(b, h * c.k_dim + half + d)) * keys((2 * h + 1) * n + i, d);
        }
        s1[i] = d1;
        s2[i] = d2;
      }
      for (double a : s1)
        for (double e : s2) all.push_back(a + e);
      std::sort(all.begin(), all.end(), std::greater<double>());
      std::vector<double> got(kn);
      for (Index j = 0; j < kn; ++j) got[j] = cache16.scores(b, h * kn + j);
      std::sort(got.begin(), got.end(), std::greater<double>());
      for (Index j = 0; j < kn; ++j)
        REQUIRE(std::abs(got[j] - all[j]) < 1e-4 * (1 + std::abs(all[j])));
    }
  }

  pkm::LayerGradients<float> g32(c), g16(bf16.params().config());
  MatF dx32(B, c.input_dim), dx16(B, c.input_dim);
  fp32.backward(x, cache32, dout, g32, dx32);
  bf16.backward(x, cache16, dout, g16, dx16);
  CHECK(rel(dx16, dx32) < 2e-2);
  for (pkm::Tensor t : {pkm::Tensor::query_weight, pkm::Tensor::swilu_weight,
                        pkm::Tensor::value_proj_weight, pkm::Tensor::keys}) {
    INFO(pkm::tensor_name(t));
    CHECK(rel(g16.params.matrix(t), g32.params.matrix(t)) < 2e-2);
  }

  // The same bits with 1 and 2 threads, and with the portable kernel within bf16's bound.
  MatF one(B, c.output_dim), dx_one(B, c.input_dim);
  pkm::LayerGradients<float> g_one(bf16.params().config());
  {
    Threads t(1);
    pkm::ForwardCache<float> cache;
    bf16.forward(x, one, cache);
    bf16.backward(x, cache, dout, g_one, dx_one);
  }
  CHECK(same_bits(one, out16));
  CHECK(same_bits(dx_one, dx16));
  CHECK(same_bits(g_one.params.query_weight(), g16.params.query_weight()));
  {
    KernelEnv env("portable");
    MatF port(B, c.output_dim);
    pkm::ForwardCache<float> cache;
    bf16.forward(x, port, cache);
    CHECK(rel(port, out16) < 1e-4);
  }
}

TEST_CASE("score_compute = BF16: the top-k is brute force's over the bf16 product's scores, and "
          "a token's bits do not depend on its batch",
          "[gemm_bf16][layer][key_search]") {
  const pkmtest::Bf16ProductsHere here;
  REQUIRE(pkm::bf16_products_here());
  for (bool qk : {false, true}) {
    auto c = pkmtest::medium_config();
    c.n_keys = 64;
    c.knn = 16;  // a multiple of 16: the AVX-512 half top-k where the CPU has it
    c.k_dim = 40;
    c.qk_norm = qk;
    c.compute = pkm::Dtype::bf16;  // every product bf16: a token's bits independent of its batch
    c.score_compute = pkm::Dtype::bf16;
    pkm::MemoryLayer<float> layer(c, 51);
    const Index B = 200, n = c.n_keys, half = c.half(), kn = c.knn;
    const MatF x = pkmtest::random_matrix(B, c.input_dim, 52).cast<float>();
    MatF out(B, c.output_dim);
    pkm::ForwardCache<float> cache;
    layer.forward(x, out, cache);
    // The reference scores: pkm::gemm_bf16 (tested above against double products of the
    // rounded operands), one token at a time, of the query half (or tau q / |q| with
    // qk-norm) and the head half's sub-keys (or their normalised rows).
    const float tau = float(c.effective_qk_norm_scale());
    const MatF& keys = layer.params().keys();
    MatF kn_rows = keys;
    if (qk)
      for (Index r = 0; r < kn_rows.rows(); ++r)
        kn_rows.row(r) = keys.row(r) * pkm::qk_inv_norm(keys.row(r).data(), half);
    for (Index b = 0; b < B; ++b) {
      for (Index h = 0; h < c.heads; ++h) {
        std::vector<float> s[2];
        for (Index t = 0; t < 2; ++t) {
          std::vector<float> qh(cache.query.row(b).data() + h * c.k_dim + t * half,
                                cache.query.row(b).data() + h * c.k_dim + (t + 1) * half);
          if (qk) {
            const float f = pkm::qk_inv_norm(qh.data(), half) * tau;
            for (float& v : qh) v *= f;
          }
          s[t].assign(std::size_t(n), 0.0f);
          pkm::gemm_bf16(false, true, 1, n, half, 1.0f, qh.data(), half,
                         kn_rows.data() + (2 * h + t) * n * half, half, 0.0f, s[t].data(), n);
        }
        std::vector<std::int64_t> slots(kn);
        std::vector<float> scores(kn);
        pkm::product_key_topk_brute_force(s[0].data(), s[1].data(), n, kn, slots.data(),
                                          scores.data());
        INFO("qk_norm " << qk << " token " << b << " head " << h);
        for (Index j = 0; j < kn; ++j) {
          REQUIRE(cache.indices(b, h * kn + j) == slots[std::size_t(j)]);
          REQUIRE(cache.scores(b, h * kn + j) == scores[std::size_t(j)]);
        }
      }
    }
    // A token alone, and a decoding batch of 3, give the bits they have in the batch of 200.
    for (Index rows : {1, 3}) {
      MatF part(rows, c.output_dim);
      pkm::ForwardCache<float> pc;
      layer.forward(x.topRows(rows), part, pc);
      CHECK(same_bits(part, out.topRows(rows)));
      CHECK(pc.indices == cache.indices.topRows(rows));
    }
    // With fp32 scores the same layer computes other scores.
    layer.params().set_score_compute(pkm::Dtype::f32);
    pkm::ForwardCache<float> c32;
    MatF out32(B, c.output_dim);
    layer.forward(x, out32, c32);
    CHECK_FALSE(same_bits(c32.scores, cache.scores));
    CHECK((c32.scores - cache.scores).cwiseAbs().maxCoeff() < 0.05f * cache.scores.cwiseAbs().maxCoeff());
  }
}

TEST_CASE("the bf16 layer on the golden cases: PyTorch's fp32 output within bf16's error where "
          "the same slots are selected",
          "[gemm_bf16][golden]") {
  const char* cases[] = {"memplus", "plain",       "noproj",   "gated",    "noqbias",
                         "qknorm",  "qknorm_scale", "knn_all", "random_0", "random_3"};
  for (const char* name : cases) {
    INFO(name);
    const std::string dir = std::string(PKM_TEST_DATA) + "/" + name;
    const pkm::io::SafetensorsFile ckpt(dir + ".checkpoint.safetensors"),
        in(dir + ".input.safetensors"), expected(dir + ".expected.safetensors");
    auto layer = pkm::io::load_layer<float>(ckpt);
    layer.params().set_compute(pkm::Dtype::bf16);
    MatF x(in.info("x").shape[0], in.info("x").shape[1]);
    in.read("x", x.data(), x.size());
    pkm::ForwardCache<float> cache;
    const MatF y = layer.forward(x, cache);
    const auto ey = expected.read<float>("y");
    const auto ei = expected.read<std::int64_t>("indices");
    const Eigen::Map<const MatF> yref(ey.data(), y.rows(), y.cols());
    const Index bag = cache.indices.cols();
    Index agree = 0;
    for (Index b = 0; b < y.rows(); ++b) {
      std::vector<std::int64_t> got(cache.indices.row(b).data(), cache.indices.row(b).data() + bag),
          want(ei.begin() + b * bag, ei.begin() + (b + 1) * bag);
      std::sort(got.begin(), got.end());
      std::sort(want.begin(), want.end());
      if (got != want) continue;
      ++agree;
      const double err = (y.row(b) - yref.row(b)).norm(), ref = yref.row(b).norm();
      INFO("token " << b);
      CHECK(err <= 2e-2 * ref + 1e-6);
    }
    CHECK(agree * 2 >= y.rows());
  }
}
