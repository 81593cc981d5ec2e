// Weights packed once for bf16 products (PackedBf16Matrix, gemm_bf16_nt; a layer's copies in
// pkm/packed_weights.hpp): the bits of packing on every call at any batch and thread count,
// the layer's copies made again after every kind of change of its parameters, shared by
// concurrent callers, and bad arguments refused.
#include <catch2/catch.hpp>

#include <cstdint>
#include <limits>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include <pkm/gemm_bf16.hpp>
#include <pkm/memory_layer.hpp>
#include <pkm/optim/adamw.hpp>
#include <pkm/packed_weights.hpp>

#include "support.hpp"

using Catch::Contains;
using pkm::Bf16Kernel;
using pkm::Index;
using pkmtest::same_bits;
using MatF = pkm::RowMatrix<float>;

namespace {

/// A view's buffers: those of `p`'s tensors.
pkm::ParameterBuffers<float> buffers_of(pkm::LayerParameters<float>& p) {
  auto at = [&](pkm::Tensor t) { return p.has(t) ? p.data(t) : nullptr; };
  pkm::ParameterBuffers<float> b;
  b.keys = at(pkm::Tensor::keys);
  b.query_weight = at(pkm::Tensor::query_weight);
  b.query_bias = at(pkm::Tensor::query_bias);
  b.swilu_weight = at(pkm::Tensor::swilu_weight);
  b.swilu_bias = at(pkm::Tensor::swilu_bias);
  b.value_proj_weight = at(pkm::Tensor::value_proj_weight);
  b.value_proj_bias = at(pkm::Tensor::value_proj_bias);
  b.gate_weight = at(pkm::Tensor::gate_weight);
  b.gate_bias = at(pkm::Tensor::gate_bias);
  return b;
}

/// The reference output: a copy of the layer (its own stamp, nothing packed yet) run once.
MatF output_of_copy(const pkm::MemoryLayer<float>& layer, const MatF& x) {
  const pkm::MemoryLayer<float> copy(layer.params(), layer.values().view());
  pkm::ForwardCache<float> fresh;
  MatF out(x.rows(), layer.params().config().output_dim);
  copy.forward(x, out, fresh);
  return out;
}

pkm::MemoryConfig bf16_config() {
  pkm::MemoryConfig c = pkmtest::medium_config();
  c.compute = pkm::Dtype::bf16;
  return c;
}

}  // namespace

TEST_CASE("gemm_bf16_nt with W packed once gives gemm_bf16's bits at every batch and thread count",
          "[packed_weights][gemm_bf16]") {
  // Decoding batches (1-8: tiles one micro-tile wide), a micro-tile edge (6), a tile edge
  // (192), odd k, k past one chunk (1024 pairs), n past a panel and a tile.
  struct Shape {
    Index n, k;
  };
  for (Bf16Kernel kernel : pkmtest::bf16_kernels_here()) {
    for (const Shape s : {Shape{1, 1}, Shape{65, 13}, Shape{300, 257}, Shape{70, 2051}}) {
      const MatF W = pkmtest::random_matrix(s.n, s.k + 3, 31).cast<float>();  // ldw = k + 3
      const pkm::PackedBf16Matrix packed(W.data(), s.n, s.k, s.k + 3);
      CHECK(packed.rows() == s.n);
      CHECK(packed.cols() == s.k);
      std::vector<std::uint16_t> scratch;
      for (Index m : {0, 1, 5, 8, 9, 64, 200}) {
        for (float beta : {0.0f, 1.0f, 0.5f}) {
          INFO(pkm::bf16_kernel_name(kernel) << " m " << m << " n " << s.n << " k " << s.k
                                             << " beta " << beta);
          const MatF X = pkmtest::random_matrix(m, s.k + 1, 32, 2.0).cast<float>();
          const MatF C0 = pkmtest::random_matrix(m, s.n + 2, 33).cast<float>();
          MatF want = C0, one = C0, two = C0;
          pkm::gemm_bf16(false, true, m, s.n, s.k, -0.5f, X.data(), s.k + 1, W.data(), s.k + 3,
                         beta, want.data(), s.n + 2, kernel);
          {
            pkmtest::ThreadCount t(1);
            pkm::gemm_bf16_nt(m, -0.5f, X.data(), s.k + 1, packed, beta, one.data(), s.n + 2,
                              scratch, kernel);
          }
          {
            pkmtest::ThreadCount t(2);
            pkm::gemm_bf16_nt(m, -0.5f, X.data(), s.k + 1, packed, beta, two.data(), s.n + 2,
                              scratch, kernel);
          }
          CHECK(same_bits(one, want));
          CHECK(same_bits(two, want));
        }
      }
      // Each row's bits do not depend on the batch it came in: a decoding token alone equals
      // the same token in a batch of 200.
      const MatF X = pkmtest::random_matrix(200, s.k, 34).cast<float>();
      MatF all(200, s.n), alone(1, s.n);
      pkm::gemm_bf16_nt(200, 1.0f, X.data(), s.k, packed, 0.0f, all.data(), s.n, scratch, kernel);
      for (Index r : {0, 7, 199}) {
        pkm::gemm_bf16_nt(1, 1.0f, X.row(r).data(), s.k, packed, 0.0f, alone.data(), s.n, scratch,
                          kernel);
        CHECK(same_bits(alone, all.row(r)));
      }
    }
  }
}

TEST_CASE("gemm_bf16_nt and PackedBf16Matrix refuse bad arguments and write nothing",
          "[packed_weights][gemm_bf16][hostile]") {
  const MatF W = pkmtest::random_matrix(10, 8, 41).cast<float>();
  CHECK_THROWS_WITH(pkm::PackedBf16Matrix(W.data(), 10, 8, 7),
                    Contains("ldw = 7; expected sizes >= 0 and ldw >= max(1, k)"));
  CHECK_THROWS_WITH(pkm::PackedBf16Matrix(W.data(), -1, 8, 8), Contains("W is -1 x 8"));
  CHECK_THROWS_WITH(pkm::PackedBf16Matrix(nullptr, 10, 8, 8), Contains("W is null"));
  CHECK_THROWS_WITH(pkm::PackedBf16Matrix(W.data(), std::int64_t{1} << 40, std::int64_t{1} << 40,
                                          std::int64_t{1} << 40),
                    Contains("is out of range"));
  CHECK(pkm::PackedBf16Matrix(nullptr, 0, 8, 8).rows() == 0);  // empty: nothing to read

  const pkm::PackedBf16Matrix packed(W.data(), 10, 8, 8);
  MatF x = pkmtest::random_matrix(3, 8, 42).cast<float>();
  MatF c = MatF::Constant(3, 10, 7.0f);
  std::vector<std::uint16_t> scratch;
  auto untouched = [&] { return (c.array() == 7.0f).all(); };
  CHECK_THROWS_WITH(pkm::gemm_bf16_nt(3, 1, x.data(), 7, packed, 0, c.data(), 10, scratch),
                    Contains("lda = 7 < k = 8"));
  CHECK_THROWS_WITH(pkm::gemm_bf16_nt(3, 1, x.data(), 8, packed, 0, c.data(), 9, scratch),
                    Contains("ldc = 9 < n = 10"));
  CHECK_THROWS_WITH(pkm::gemm_bf16_nt(-1, 1, x.data(), 8, packed, 0, c.data(), 10, scratch),
                    Contains("m = -1"));
  CHECK_THROWS_WITH(pkm::gemm_bf16_nt(3, 1, nullptr, 8, packed, 0, c.data(), 10, scratch),
                    Contains("null matrix pointer"));
  CHECK(untouched());
  // C over x's own rows: x would be overwritten while it is read.
  MatF xc = pkmtest::random_matrix(3, 10, 43).cast<float>();
  CHECK_THROWS_WITH(pkm::gemm_bf16_nt(3, 1, xc.data(), 10, packed, 0, xc.data(), 10, scratch),
                    Contains("C overlaps x"));
  if (!pkm::bf16_kernel_available(Bf16Kernel::avx512_bf16)) {
    CHECK_THROWS_WITH(pkm::gemm_bf16_nt(3, 1, x.data(), 8, packed, 0, c.data(), 10, scratch,
                                        Bf16Kernel::avx512_bf16),
                      Contains("lacks AVX512-BF16"));
  }
  // alpha == 0: C = beta C, x not read (NaN in x stays out).
  x(0, 0) = std::numeric_limits<float>::quiet_NaN();
  pkm::gemm_bf16_nt(3, 0.0f, x.data(), 8, packed, 0.5f, c.data(), 10, scratch);
  CHECK((c.array() == 3.5f).all());

  // linear_forward refuses a packed copy of another W, or the wrong compute, before writing.
  const MatF W2 = W;
  MatF y = MatF::Constant(3, 10, 7.0f);
  const MatF xx = pkmtest::random_matrix(3, 8, 44).cast<float>();
  CHECK_THROWS_WITH(pkm::linear_forward<float>(xx, W2, nullptr, y, pkm::Dtype::bf16, &packed,
                                               &scratch),
                    Contains("the packed weight (10 x 8) is not W's (10 x 8, x with 8 columns)"));
  const MatF x9 = pkmtest::random_matrix(3, 9, 45).cast<float>();
  const MatF W9 = pkmtest::random_matrix(10, 9, 46).cast<float>();
  CHECK_THROWS_WITH(pkm::linear_forward<float>(x9, W9, nullptr, y, pkm::Dtype::bf16, &packed,
                                               &scratch),
                    Contains("the packed weight (10 x 8) is not W's (10 x 9"));
  CHECK_THROWS_WITH(pkm::linear_forward<float>(xx, W, nullptr, y, pkm::Dtype::f32, &packed,
                                               &scratch),
                    Contains("a packed weight with compute = F32; expected float operands and "
                             "compute = BF16"));
  CHECK_THROWS_WITH(pkm::linear_forward<float>(xx, W, nullptr, y, pkm::Dtype::bf16, &packed,
                                               nullptr),
                    Contains("x_pack is null"));
  CHECK((y.array() == 7.0f).all());
}

TEST_CASE("the bf16 layer packs its weights once per change, and every change packs them again",
          "[packed_weights][layer]") {
  const pkmtest::Bf16ProductsHere here;
  const auto c = bf16_config();
  pkm::MemoryLayer<float> layer(c, 51);
  pkm::ForwardCache<float> cache;
  const MatF x = pkmtest::random_matrix(5, c.input_dim, 52).cast<float>();
  MatF y(5, c.output_dim);
  auto fresh_output = [&] { return output_of_copy(layer, x); };

  layer.forward(x, y, cache);
  const auto first = pkm::packed_weights(std::as_const(layer).params());
  REQUIRE(first != nullptr);
  CHECK(first->of(pkm::Tensor::query_weight)->rows() == c.heads * c.k_dim);
  CHECK(first->of(pkm::Tensor::swilu_weight)->rows() == c.v_dim);
  CHECK(first->of(pkm::Tensor::value_proj_weight)->rows() == c.output_dim);
  CHECK(first->of(pkm::Tensor::keys) == nullptr);  // the key search stays fp32
  CHECK(cache.products.packed == nullptr);  // the forward does not pin them
  layer.forward(x, y, cache);
  CHECK(pkm::packed_weights(std::as_const(layer).params()) == first);  // not packed again
  CHECK(same_bits(y, fresh_output()));

  // A non-const access marks the parameters changed: the next forward packs again.
  layer.params().query_weight()(0, 0) += 1.0f;
  layer.forward(x, y, cache);
  const auto second = pkm::packed_weights(std::as_const(layer).params());
  CHECK(second != first);
  CHECK(same_bits(y, fresh_output()));

  // An optimizer step writes through its own pointers and marks the stamp.
  pkm::LayerParameters<float> grads(c);
  pkm::optim::AdamW<float> opt(pkm::optim::AdamOptions{1e-2});
  opt.add("mem.", layer.params(), grads);
  grads.matrix(pkm::Tensor::swilu_weight).setConstant(0.1f);
  const MatF before = y;
  opt.step();
  layer.forward(x, y, cache);
  CHECK(pkm::packed_weights(std::as_const(layer).params()) != second);
  CHECK_FALSE(same_bits(y, before));
  CHECK(same_bits(y, fresh_output()));

  // A view of the caller's buffers: writes there are announced with mark_modified().
  pkm::LayerParameters<float> owned(c);
  pkm::init_parameters(owned, 53);
  const pkm::ParameterBuffers<float> b = buffers_of(owned);
  pkm::MemoryLayer<float> viewing(pkm::LayerParameters<float>::view(c, b),
                                  layer.values().view());
  MatF v1(5, c.output_dim), v2(5, c.output_dim), v3(5, c.output_dim);
  viewing.forward(x, v1, cache);
  b.value_proj_weight[3] *= -2.0f;  // the caller's own write
  viewing.params().mark_modified();
  viewing.forward(x, v2, cache);
  CHECK_FALSE(same_bits(v1, v2));
  const pkm::MemoryLayer<float> copy(viewing.params(), layer.values().view());
  copy.forward(x, v3, cache);
  CHECK(same_bits(v2, v3));
}

TEST_CASE("views of other buffers under one stamp each use their own packed weights",
          "[packed_weights][layer]") {
  // The PyTorch operator hands one stamp to the views of unchanged tensors; a view of other
  // buffers under that stamp (at the same version) must not read the first view's copies.
  const pkmtest::Bf16ProductsHere here;
  const auto c = bf16_config();
  pkm::LayerParameters<float> a(c), b(c);
  pkm::init_parameters(a, 91);
  pkm::init_parameters(b, 92);
  pkm::ValueTable<float> table(c.slots(), c.v_dim);
  pkm::init_values(table, 93);
  const auto stamp = std::make_shared<pkm::detail::ModificationStamp>();
  const pkm::MemoryLayer<float> la(pkm::LayerParameters<float>::view(c, buffers_of(a), stamp),
                                   table.view());
  const pkm::MemoryLayer<float> lb(pkm::LayerParameters<float>::view(c, buffers_of(b), stamp),
                                   table.view());
  const MatF x = pkmtest::random_matrix(4, c.input_dim, 94).cast<float>();
  MatF ya(4, c.output_dim), yb(4, c.output_dim), want(4, c.output_dim);
  pkm::ForwardCache<float> cache;
  la.forward(x, ya, cache);
  lb.forward(x, yb, cache);
  const pkm::MemoryLayer<float> own(b, table.view());  // a copy: a stamp of its own
  own.forward(x, want, cache);
  CHECK(same_bits(yb, want));
  CHECK_FALSE(same_bits(ya, yb));
}

TEST_CASE("the bf16 layer's products are bf16 at every batch: a token alone gives its bits in a "
          "batch, and differs from fp32 products",
          "[packed_weights][layer][small_batch]") {
  const pkmtest::Bf16ProductsHere here;
  const auto c = bf16_config();
  const pkm::MemoryLayer<float> bf16(c, 61);
  pkm::LayerParameters<float> p32 = bf16.params();
  p32.set_compute(pkm::Dtype::f32);
  const pkm::MemoryLayer<float> fp32(std::move(p32), bf16.values().view());
  pkm::ForwardCache<float> cache;
  const MatF x = pkmtest::random_matrix(8, c.input_dim, 62).cast<float>();
  MatF batch(8, c.output_dim), alone(1, c.output_dim), f32(1, c.output_dim);
  bf16.forward(x, batch, cache);
  for (Index r = 0; r < 8; ++r) {
    INFO("token " << r);
    bf16.forward(x.row(r), alone, cache);
    CHECK(same_bits(alone, batch.row(r)));
    fp32.forward(x.row(r), f32, cache);
    CHECK_FALSE(same_bits(alone, f32));  // the products were rounded
  }
}

TEST_CASE("the bf16 layer from several threads at once: the serial bits",
          "[packed_weights][layer][threads]") {
  const pkmtest::Bf16ProductsHere here;
  const auto c = bf16_config();
  const pkm::MemoryLayer<float> layer(c, 71);
  constexpr int kThreads = 4;
  std::vector<MatF> xs, serial, parallel;
  for (int t = 0; t < kThreads; ++t) {
    xs.push_back(pkmtest::random_matrix(3 + t, c.input_dim, 72 + t).cast<float>());
    serial.emplace_back(3 + t, c.output_dim);
    parallel.emplace_back(3 + t, c.output_dim);
  }
  {
    pkm::ForwardCache<float> cache;
    for (int t = 0; t < kThreads; ++t) layer.forward(xs[t], serial[t], cache);
  }
  const pkm::MemoryLayer<float> twin(layer.params(), layer.values().view());  // nothing packed
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      pkm::ForwardCache<float> cache;
      for (int rep = 0; rep < 20; ++rep) twin.forward(xs[t], parallel[t], cache);
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) CHECK(same_bits(parallel[t], serial[t]));
  CHECK(pkm::packed_weights(twin.params()) != nullptr);
}

TEST_CASE("fp32 layers, double layers and CPUs without bf16 products pack nothing",
          "[packed_weights][layer]") {
  const pkm::MemoryLayer<float> f32(pkmtest::medium_config(), 81);
  CHECK(pkm::packed_weights(f32.params()) == nullptr);
  const pkm::MemoryLayer<double> f64(pkmtest::medium_config(), 81);
  CHECK(pkm::packed_weights(f64.params()) == nullptr);
  if (!pkm::bf16_products_here()) {
    const pkm::MemoryLayer<float> b(bf16_config(), 81);
    CHECK(pkm::packed_weights(b.params()) == nullptr);
  }
}

TEST_CASE("bf16 half scores pack the sub-keys once per change of the keys, and give the bits "
          "of packing them on every call",
          "[packed_weights][layer][key_search]") {
  const pkmtest::Bf16ProductsHere here;
  auto c = pkmtest::medium_config();
  c.score_compute = pkm::Dtype::bf16;  // fp32 products, bf16 half scores
  pkm::MemoryLayer<float> layer(c, 101);
  const MatF x = pkmtest::random_matrix(6, c.input_dim, 102).cast<float>();
  MatF y(6, c.output_dim);
  pkm::ForwardCache<float> cache;
  // The reference: the key search called without packed keys (it packs them itself), on the
  // query of this forward.
  auto check_against_packing_per_call = [&] {
    pkm::KeySearchCache<float> ref;
    pkm::KeySearchWorkspace<float> ws;
    pkm::key_search_forward<float>(layer.params().config(), std::as_const(layer).params().keys(),
                                   cache.query, ref, ws);
    CHECK(ref.indices == cache.indices);
    CHECK(same_bits(ref.scores, cache.scores));
    CHECK(same_bits(ref.weights, cache.weights));
  };
  auto fresh_output = [&] { return output_of_copy(layer, x); };

  layer.forward(x, y, cache);
  const auto first = pkm::packed_weights(std::as_const(layer).params());
  REQUIRE(first != nullptr);
  REQUIRE(first->key_halves.size() == std::size_t(2 * c.heads));
  const float* keys = std::as_const(layer).params().keys().data();
  for (Index i = 0; i < 2 * c.heads; ++i) {
    CHECK(first->key_halves[std::size_t(i)].source() == keys + i * c.n_keys * c.half());
    CHECK(first->key_halves[std::size_t(i)].rows() == c.n_keys);
    CHECK(first->key_halves[std::size_t(i)].cols() == c.half());
  }
  for (pkm::Tensor t : pkm::detail::PackedLayerWeights::kTensors)
    CHECK(first->of(t) == nullptr);  // fp32 products: the weights are not packed
  check_against_packing_per_call();
  layer.forward(x, y, cache);
  CHECK(pkm::packed_weights(std::as_const(layer).params()) == first);  // not packed again
  CHECK(same_bits(y, fresh_output()));

  // A change of the keys packs them again, and the forward follows it.
  layer.params().keys()(3, 1) += 2.0f;
  const MatF before = y;
  layer.forward(x, y, cache);
  const auto second = pkm::packed_weights(std::as_const(layer).params());
  CHECK(second != first);
  CHECK(same_bits(y, fresh_output()));
  check_against_packing_per_call();

  // compute = BF16 as well: weights and keys in one set of copies; a changed compute or
  // score_compute is not served the copies made for the other.
  layer.params().set_compute(pkm::Dtype::bf16);
  const auto both = pkm::packed_weights(std::as_const(layer).params());
  REQUIRE(both != nullptr);
  CHECK(both->of(pkm::Tensor::query_weight)->rows() == c.heads * c.k_dim);
  CHECK(both->key_halves.size() == std::size_t(2 * c.heads));
  layer.params().set_score_compute(pkm::Dtype::f32);
  const auto weights_only = pkm::packed_weights(std::as_const(layer).params());
  REQUIRE(weights_only != nullptr);
  CHECK(weights_only->key_halves.empty());
  layer.forward(x, y, cache);
  CHECK(same_bits(y, fresh_output()));
  layer.params().set_compute(pkm::Dtype::f32);
  CHECK(pkm::packed_weights(std::as_const(layer).params()) == nullptr);

  // qk-norm: the normalised keys change per call, so nothing is packed for the scores.
  c.qk_norm = true;
  const pkm::MemoryLayer<float> normed(c, 103);
  CHECK(pkm::packed_weights(normed.params()) == nullptr);
}

TEST_CASE("key_search_forward refuses packed keys that are not its keys' halves, before writing",
          "[packed_weights][key_search][hostile]") {
  const pkmtest::Bf16ProductsHere here;
  auto c = pkmtest::medium_config();
  c.score_compute = pkm::Dtype::bf16;
  const pkm::MemoryLayer<float> layer(c, 111);
  const auto packed = pkm::packed_weights(layer.params());
  REQUIRE(packed != nullptr);
  const MatF q = pkmtest::random_matrix(3, c.heads * c.k_dim, 112).cast<float>();
  const MatF other_keys = layer.params().keys();  // equal values, other memory
  pkm::KeySearchCache<float> cache;
  cache.indices = pkm::IndexMatrix::Constant(2, 2, 7);
  pkm::KeySearchWorkspace<float> ws;
  CHECK_THROWS_WITH(pkm::key_search_forward<float>(c, other_keys, q, cache, ws,
                                                   &packed->key_halves),
                    Contains("packed_keys [0] is 32 x 8 packed from other memory; expected the "
                             "keys' rows 0..31, 32 x 8"));
  std::vector<pkm::PackedBf16Matrix> fewer(packed->key_halves.begin(),
                                           packed->key_halves.end() - 1);
  CHECK_THROWS_WITH(
      pkm::key_search_forward<float>(c, layer.params().keys(), q, cache, ws, &fewer),
      Contains("packed_keys holds 7 matrices; expected 2 x heads = 8"));
  std::vector<pkm::PackedBf16Matrix> swapped = packed->key_halves;
  std::swap(swapped[2], swapped[5]);
  CHECK_THROWS_WITH(
      pkm::key_search_forward<float>(c, layer.params().keys(), q, cache, ws, &swapped),
      Contains("packed_keys [2]"));
  CHECK(cache.indices == pkm::IndexMatrix::Constant(2, 2, 7));  // nothing written
  // Where the scores are fp32 ones the packed keys are not used (nor checked).
  auto c32 = c;
  c32.score_compute = pkm::Dtype::f32;
  pkm::key_search_forward<float>(c32, layer.params().keys(), q, cache, ws, &fewer);
  CHECK(cache.indices.rows() == 3);
}
