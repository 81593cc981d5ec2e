// pkm/key_search.hpp — the key-search op of a memory layer: per head, query halves -> half
// scores against the head's sub-keys (optionally qk-normalised) -> the exact product-key top-k
// -> the weights (softmax, or ReLU: MemoryConfig::score_activation); and its backward, from
// the gradient of the weights to the query gradient dq and the (sparse) sub-key gradient.
//
// Forward: for a chunk of up to kSearchChunk tokens and one head, the two half-score products
// (chunk x half) * (half x n_keys) are each one pkm::gemm (or, with MemoryConfig::score_compute
// = BF16, one bf16 product against the sub-keys packed in bf16: by the caller once per change
// of the keys, pkm/packed_weights.hpp, or here once per call); then the tokens' top-k
// and weights run in parallel over fixed blocks of tokens. Backward: the weights' backward, the selection's
// gradient to the half scores, dq per token, and the sub-key gradient reduced per key row in a
// fixed order (stable grouping by row). The same bits with any thread count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "pkm/config.hpp"
#include "pkm/detail/checks.hpp"
#include "pkm/detail/parallel.hpp"
#include "pkm/detail/segment_reduce.hpp"
#include "pkm/detail/vec_math.hpp"
#include "pkm/gemm.hpp"
#include "pkm/gemm_bf16.hpp"
#include "pkm/product_keys.hpp"
#include "pkm/qk_norm.hpp"
#include "pkm/softmax.hpp"
#include "pkm/types.hpp"

namespace pkm {

/// Tokens whose half scores are computed by one product (bounds the score buffer to
/// kSearchChunk x 2 n_keys values).
inline constexpr Index kSearchChunk = 1024;
/// Tokens per parallel block of the top-k / softmax / backward loops.
inline constexpr Index kSearchBlock = 16;

/// What the key search's forward keeps for its backward (and for the caller to inspect).
template <class S>
struct KeySearchCache {
  IndexMatrix indices;           ///< B x (H knn): slot ids, per head best first
  RowMatrix<S> scores;           ///< B x (H knn): raw scores, descending per head
  RowMatrix<S> weights;          ///< B x (H knn): the scores' weights per head (softmax or ReLU)
  RowMatrix<S> query_inv_norm;   ///< B x 2H: 1/|q half| (qk_norm only)
  RowMatrix<S> keys_normalized;  ///< (2 H n_keys) x half (qk_norm only)
  Vector<S> key_inv_norm;        ///< 2 H n_keys: 1/|key row| (qk_norm only)
};

/// Buffers the key search reuses from call to call (no allocation once warm).
template <class S>
struct KeySearchWorkspace {
  RowMatrix<S> query_hat;    ///< chunk x (H k_dim): tau q / |q| (qk_norm only)
  RowMatrix<S> half_scores;  ///< chunk x 2 n_keys: one head's two half-score rows per token
                             ///< (chunk x 2 H n_keys, every head's, for a decoding batch)
  std::vector<ProductKeyScratch<S>> topk;  ///< one per thread: the top-k's candidate lists
  std::vector<PackedBf16Matrix> score_keys;  ///< score_compute = BF16: each head half's sub-keys
  std::vector<std::uint16_t> score_x_pack;   ///< and its query rows, packed
  std::vector<detail::RowContribution<S>> key_items;  ///< backward: (key row, token, coef)
  detail::GroupScratch<S> group;
  detail::RowSegments key_segments;
};

/// The sub-keys the scores are computed against: the parameters, or their normalised copy.
template <class S>
const S* key_search_keys(const MemoryConfig& c, const ConstMatrixRef<S>& keys,
                         const KeySearchCache<S>& cache) {
  return c.qk_norm ? cache.keys_normalized.data() : keys.data();
}

namespace detail {
/// True where the layer's half scores are bf16 products: MemoryConfig::score_compute = BF16
/// on a float layer, and bf16 products run here (pkm::bf16_products_here()).
template <class S>
bool bf16_half_scores(const MemoryConfig& c) {
  if constexpr (std::is_same_v<S, float>)
    return c.score_compute == Dtype::bf16 && bf16_products_here();
  else
    return false;
}

/// Why `packed` is not the 2H halves of the sub-keys at `keys` (2 H n_keys x half, each half
/// packed from its own rows), or nothing where it is.
inline std::optional<std::string> key_halves_mismatch(const MemoryConfig& c, const float* keys,
                                                      const std::vector<PackedBf16Matrix>& packed) {
  const Index halves = 2 * c.heads, n = c.n_keys, half = c.half();
  if (packed.size() != static_cast<std::size_t>(halves)) {
    return "holds " + std::to_string(packed.size()) +
           " matrices; expected 2 x heads = " + std::to_string(halves);
  }
  for (Index i = 0; i < halves; ++i) {
    const PackedBf16Matrix& m = packed[static_cast<std::size_t>(i)];
    const float* want = keys + i * n * half;
    if (m.source() != want || m.rows() != n || m.cols() != half) {
      return "[" + std::to_string(i) + "] is " + std::to_string(m.rows()) + " x " +
             std::to_string(m.cols()) + (m.source() == want ? "" : " packed from other memory") +
             "; expected the keys' rows " + std::to_string(i * n) + ".." +
             std::to_string((i + 1) * n - 1) + ", " + std::to_string(n) + " x " +
             std::to_string(half);
    }
  }
  return std::nullopt;
}

/// The operands both directions share: a valid config, keys (2 H n_keys x half, rows
/// contiguous) and query (B x H k_dim). Throws std::invalid_argument naming the first one
/// that is not.
template <class S>
void check_key_search_operands(const char* who, const MemoryConfig& c,
                               const ConstMatrixRef<S>& keys, const ConstMatrixRef<S>& query) {
  c.validate();
  check_same_shape(who, "keys", keys.rows(), keys.cols(), 2 * c.heads * c.n_keys, c.half());
  if (keys.rows() > 1 && keys.outerStride() != keys.cols()) {
    throw std::invalid_argument(std::string(who) + ": the keys' rows are " +
                                std::to_string(keys.outerStride()) +
                                " values apart; expected contiguous rows (k_dim / 2 = " +
                                std::to_string(keys.cols()) + ")");
  }
  if (query.cols() != c.heads * c.k_dim) {
    throw std::invalid_argument(std::string(who) + ": query has " + std::to_string(query.cols()) +
                                " columns, expected heads x k_dim = " +
                                std::to_string(c.heads * c.k_dim));
  }
}

/// Says why token b, head h has a non-finite half score: which input holds a non-finite
/// value, or that finite ones overflow in the product.
template <class S>
[[noreturn]] void throw_non_finite_half_score(const MemoryConfig& c, const ConstMatrixRef<S>& keys,
                                              const ConstMatrixRef<S>& query, Index b, Index h) {
  const std::string where =
      "pkm::key_search_forward: token " + std::to_string(b) + ", head " + std::to_string(h);
  const auto q = query.row(b).segment(h * c.k_dim, c.k_dim);
  const auto k = keys.middleRows(2 * h * c.n_keys, 2 * c.n_keys);
  if (!q.allFinite()) {
    throw std::runtime_error(
        where +
        ": the query (q = Wq x + bq) is not finite; the query weights or bias hold "
        "non-finite values, or are so large that the product overflows");
  }
  if (!k.allFinite())
    throw std::runtime_error(where + ": the head's sub-keys hold non-finite values");
  throw std::runtime_error(
      where + ": a half score overflows: the query and the sub-keys are finite but too large" +
      std::string(c.qk_norm ? " (after qk-normalisation and its scale)" : ""));
}
}  // namespace detail

/// Forward: `keys` (2 H n_keys x half) and `query` (B x H k_dim) -> cache.indices, scores,
/// weights (and the qk-norm factors). With bf16 half scores and no qk-norm, `packed_keys` may
/// give the 2H halves of `keys` already packed at their current values (PackedBf16Matrix of
/// keys.data() + i n_keys half, n_keys x half each, as pkm::packed_weights makes them);
/// otherwise the keys are packed here.
/// Throws std::invalid_argument for an invalid config, keys or query of other shapes (or keys
/// whose rows are not contiguous), or packed keys that are not `keys`' halves, before writing
/// anything; and std::runtime_error naming the token and head if a half score or a score is
/// not finite, and why (a non-finite input, or an overflow).
template <class S>
void key_search_forward(const MemoryConfig& c, const ConstMatrixRef<S>& keys,
                        const ConstMatrixRef<S>& query, KeySearchCache<S>& cache,
                        KeySearchWorkspace<S>& ws,
                        const std::vector<PackedBf16Matrix>* packed_keys = nullptr) {
  const Index B = query.rows(), H = c.heads, n = c.n_keys, k = c.knn, half = c.half(), kd = c.k_dim;
  const Index bag = c.bag_size();
  detail::check_key_search_operands("pkm::key_search_forward", c, keys, query);
  const bool bf16 = detail::bf16_half_scores<S>(c);
  if constexpr (std::is_same_v<S, float>) {
    if (packed_keys != nullptr && bf16 && !c.qk_norm) {
      if (auto why = detail::key_halves_mismatch(c, keys.data(), *packed_keys))
        throw std::invalid_argument("pkm::key_search_forward: packed_keys " + *why);
    } else {
      packed_keys = nullptr;
    }
  } else {
    packed_keys = nullptr;
  }
  cache.indices.resize(B, bag);
  cache.scores.resize(B, bag);
  cache.weights.resize(B, bag);
  if (B == 0) return;
  const S tau = static_cast<S>(c.effective_qk_norm_scale());
  if (c.qk_norm) {
    const Index rows = 2 * H * n;
    cache.query_inv_norm.resize(B, 2 * H);
    cache.keys_normalized.resize(rows, half);
    cache.key_inv_norm.resize(rows);
    detail::parallel_blocks(rows, 64, [&](Index r0, Index r1) {
      for (Index r = r0; r < r1; ++r) {
        const S inv = qk_inv_norm(keys.row(r).data(), half);
        cache.key_inv_norm[r] = inv;
        cache.keys_normalized.row(r) = keys.row(r) * inv;
      }
    });
  }
  const S* K = key_search_keys(c, keys, cache);
  const Index chunk =
      std::min(kSearchChunk, B);  // buffers sized once: a last, shorter chunk reuses them
  if (c.qk_norm) ws.query_hat.resize(chunk, H * kd);
  // bf16 scores: each head half's sub-keys rounded and packed (here once per call, unless the
  // caller packed them), and every batch size takes the same product (a token's scores do not
  // depend on the batch).
  const std::vector<PackedBf16Matrix>& bf16_keys = packed_keys ? *packed_keys : ws.score_keys;
  if constexpr (std::is_same_v<S, float>) {
    if (bf16 && packed_keys == nullptr) {
      ws.score_keys.resize(static_cast<std::size_t>(2 * H));
      for (Index p = 0; p < 2 * H; ++p)
        ws.score_keys[static_cast<std::size_t>(p)].assign(K + p * n * half, n, half, half);
    }
  }
  // A decoding batch (one chunk) takes every head's scores at once (below).
  const bool small = bf16 ? B <= detail::kSmallGemmRows
                          : detail::takes_small_kernel(false, true, B, gemm_backend());
  ws.half_scores.resize(chunk, small ? 2 * H * n : 2 * n);
  for (Index c0 = 0; c0 < B; c0 += kSearchChunk) {
    const Index nb = std::min(kSearchChunk, B - c0);
    // The query rows the scores use: q itself, or tau q / |q| per half (tau folded in).
    const S* q = query.data() + c0 * query.outerStride();
    Index ldq = query.outerStride();
    if (c.qk_norm) {
      detail::parallel_blocks(nb, kSearchBlock, [&](Index b0, Index b1) {
        for (Index b = b0; b < b1; ++b) {
          for (Index p = 0; p < 2 * H; ++p) {
            const S* qp = query.row(c0 + b).data() + p * half;
            const S inv = qk_inv_norm(qp, half);
            cache.query_inv_norm(c0 + b, p) = inv;
            const S f = inv * tau;
            S* out = ws.query_hat.row(b).data() + p * half;
            for (Index d = 0; d < half; ++d) out[d] = qp[d] * f;
          }
        }
      });
      q = ws.query_hat.data();
      ldq = ws.query_hat.outerStride();
    }
    // Token b, head h: the exact top-k over its two half-score rows (`row`, 2 n values) and
    // the weights of the k scores (softmax or ReLU: MemoryConfig::score_activation).
    auto search = [&](ProductKeyScratch<S>& sc, Index b, Index h, const S* row) {
      if (!detail::all_finite(row, 2 * n))
        detail::throw_non_finite_half_score(c, keys, query, c0 + b, h);
      const Index col = h * k;
      product_key_topk(row, row + n, n, k, &cache.indices(c0 + b, col), &cache.scores(c0 + b, col),
                       sc);
      // Two finite half scores can still add up to an infinity.
      if (!detail::all_finite(&cache.scores(c0 + b, col), k)) {
        throw std::runtime_error(
            "pkm::key_search_forward: token " + std::to_string(c0 + b) + ", head " +
            std::to_string(h) +
            ": a score (the sum of two finite half scores) overflows; the "
            "query or the sub-keys are too large");
      }
      score_weights_forward(c.score_activation, &cache.scores(c0 + b, col), k,
                            &cache.weights(c0 + b, col));
    };
    if (small) {
      // A decoding batch: every head's half scores in one parallel region, then every (head,
      // token)'s top-k in another, instead of three regions per head, whose waits cost more
      // than the work at this size. The scores are pkm::gemm's small-batch kernel's (or the
      // bf16 product's), column block by column block: the bits pkm::gemm (gemm_bf16_nt)
      // gives these rows.
      S* s = ws.half_scores.data();
      const Index ld = 2 * H * n;
      Index col_block = detail::kSmallGemmColBlock;
      std::int64_t x_size = 0;
      Bf16Kernel kernel = Bf16Kernel::portable;
      if constexpr (std::is_same_v<S, float>) {
        if (bf16) {  // each head half's query rows packed once, by this thread (a few rows)
          col_block = detail::kBf16NR;
          kernel = bf16_kernel();
          x_size = detail::packed_size<detail::kBf16MR>(nb, half);
          ws.score_x_pack.resize(static_cast<std::size_t>(2 * H * x_size));
          for (Index p = 0; p < 2 * H; ++p) {
            detail::pack_bf16_rows(q + p * half, ldq, nb, half,
                                   ws.score_x_pack.data() + p * x_size);
          }
        }
      }
      const Index blocks = (n + col_block - 1) / col_block;
      detail::parallel_blocks(2 * H * blocks, 1, [&](Index i0, Index i1) {
        for (Index i = i0; i < i1; ++i) {
          const Index p = i / blocks;  // head h = p / 2, half t = p % 2
          const Index j0 = (i % blocks) * col_block, j1 = std::min(n, j0 + col_block);
          if constexpr (std::is_same_v<S, float>) {
            if (bf16) {
              detail::gemm_bf16_block(0, nb, j0, j1, half, 1.0f,
                                      ws.score_x_pack.data() + p * x_size,
                                      bf16_keys[static_cast<std::size_t>(p)].panels(), 0.0f,
                                      s + p * n, ld, kernel);
              continue;
            }
          }
          detail::gemm_small_nt_cols(nb, j0, j1, half, S(1), q + p * half, ldq, K + p * n * half,
                                     half, S(0), s + p * n, ld);
        }
      });
      detail::parallel_blocks_pooled(
          H * nb, 1, ws.topk, [&](ProductKeyScratch<S>& sc, Index i0, Index i1) {
            for (Index i = i0; i < i1; ++i) {
              const Index h = i / nb, b = i % nb;
              search(sc, b, h, s + b * ld + 2 * h * n);
            }
          });
      continue;
    }
    S* s = ws.half_scores.data();
    for (Index h = 0; h < H; ++h) {
      for (Index t = 0; t < 2; ++t) {
        if constexpr (std::is_same_v<S, float>) {
          if (bf16) {
            gemm_bf16_nt(nb, 1.0f, q + h * kd + t * half, ldq,
                         bf16_keys[static_cast<std::size_t>(2 * h + t)], 0.0f, s + t * n,
                         2 * n, ws.score_x_pack);
            continue;
          }
        }
        gemm<S>(false, true, nb, n, half, S(1), q + h * kd + t * half, ldq,
                K + (2 * h + t) * n * half, half, S(0), s + t * n, 2 * n);
      }
      detail::parallel_blocks_pooled(
          nb, kSearchBlock, ws.topk, [&](ProductKeyScratch<S>& sc, Index b0, Index b1) {
            for (Index b = b0; b < b1; ++b) search(sc, b, h, s + b * 2 * n);
          });
    }
  }
}

/// Backward: given dscore = the gradient of the weights (B x H knn; overwritten with the
/// gradient of the scores), writes dq (B x H k_dim) and adds the sub-key gradient to dkeys
/// (2 H n_keys x half). `keys` and `query` are the forward's, `cache` the one it filled.
/// Throws std::invalid_argument, before writing anything, for the forward's errors, a cache
/// of another batch or config (its shapes, or a slot outside [0, n_keys^2)), or dscore, dq or
/// dkeys of other shapes.
template <class S>
void key_search_backward(const MemoryConfig& c, const ConstMatrixRef<S>& keys,
                         const ConstMatrixRef<S>& query, const KeySearchCache<S>& cache,
                         MatrixRef<S> dscore, MatrixRef<S> dq, MatrixRef<S> dkeys,
                         KeySearchWorkspace<S>& ws) {
  const Index B = query.rows(), H = c.heads, n = c.n_keys, k = c.knn, half = c.half(), kd = c.k_dim;
  const char* who = "pkm::key_search_backward";
  detail::check_key_search_operands(who, c, keys, query);
  const Index bag = c.bag_size();
  detail::check_same_shape(who, "cache.indices", cache.indices.rows(), cache.indices.cols(), B,
                           bag);
  detail::check_same_shape(who, "cache.scores", cache.scores.rows(), cache.scores.cols(), B, bag);
  detail::check_same_shape(who, "cache.weights", cache.weights.rows(), cache.weights.cols(), B,
                           bag);
  if (c.qk_norm) {
    detail::check_same_shape(who, "cache.query_inv_norm", cache.query_inv_norm.rows(),
                             cache.query_inv_norm.cols(), B, 2 * H);
    detail::check_same_shape(who, "cache.keys_normalized", cache.keys_normalized.rows(),
                             cache.keys_normalized.cols(), keys.rows(), half);
    detail::check_same_shape(who, "cache.key_inv_norm", cache.key_inv_norm.size(), 1,
                             keys.rows(), 1);
  }
  detail::check_same_shape(who, "dscore", dscore.rows(), dscore.cols(), B, bag);
  detail::check_same_shape(who, "dq", dq.rows(), dq.cols(), B, H * kd);
  detail::check_same_shape(who, "dkeys", dkeys.rows(), dkeys.cols(), keys.rows(), half);
  const std::int64_t slots = n * n;
  for (Index e = 0; e < cache.indices.size(); ++e) {
    const std::int64_t id = cache.indices.data()[e];
    if (id < 0 || id >= slots) {
      throw std::invalid_argument(std::string(who) + ": cache.indices(" + std::to_string(e / bag) +
                                  ", " + std::to_string(e % bag) + ") = " + std::to_string(id) +
                                  " is outside [0, n_keys^2 = " + std::to_string(slots) +
                                  "); expected the forward's cache");
    }
  }
  if (B == 0) return;
  const S tau = static_cast<S>(c.effective_qk_norm_scale());
  const S* K = key_search_keys(c, keys, cache);
  ws.key_items.resize(static_cast<std::size_t>(B * H * 2 * k));
  detail::parallel_blocks(B, kSearchBlock, [&](Index b0, Index b1) {
    for (Index b = b0; b < b1; ++b) {
      dq.row(b).setZero();
      for (Index h = 0; h < H; ++h) {
        S* z = &dscore(b, h * k);
        score_weights_backward(c.score_activation, &cache.scores(b, h * k),
                               &cache.weights(b, h * k), z, k, z);
        std::size_t pos = static_cast<std::size_t>((b * H + h) * 2 * k);
        product_key_backward(&cache.indices(b, h * k), z, k, n, [&](Index t, Index id, S g) {
          const Index row = (2 * h + t) * n + id;
          S* dqh = &dq(b, h * kd + t * half);
          const S* kr = K + row * half;
          const S gs = c.qk_norm ? g * tau : g;
          for (Index d = 0; d < half; ++d) dqh[d] += gs * kr[d];
          const S coef = c.qk_norm ? gs * cache.query_inv_norm(b, 2 * h + t) : g;
          ws.key_items[pos++] = {row, b, coef};
        });
        if (c.qk_norm) {
          for (Index t = 0; t < 2; ++t) {
            S* dqh = &dq(b, h * kd + t * half);
            qk_norm_backward(query.row(b).data() + h * kd + t * half,
                             cache.query_inv_norm(b, 2 * h + t), dqh, half, dqh);
          }
        }
      }
    }
  });
  // Sub-key gradient: row r of head h, half t gets the sum over its contributions of coef * q
  // half, reduced into a per-thread row and added to dkeys at once (no gradient rows stored).
  detail::group_by_row(ws.key_items, 2 * H * n, ws.group, ws.key_segments);
  auto source = [&](std::int64_t b, std::int64_t row) {
    return query.row(b).data() + (row / n) * half;
  };
  const auto& rows = ws.key_segments.rows;
  detail::parallel_blocks_with<std::vector<S>>(
      static_cast<Index>(rows.size()), detail::kSegmentBlock,
      [&](std::vector<S>& g, Index u0, Index u1) {
        g.resize(static_cast<std::size_t>(half));
        for (Index u = u0; u < u1; ++u) {
          const Index r = rows[static_cast<std::size_t>(u)];
          detail::reduce_segment(ws.key_items, ws.key_segments, u, half, source, g.data());
          if (c.qk_norm)
            qk_norm_backward(keys.row(r).data(), cache.key_inv_norm[r], g.data(), half, g.data());
          dkeys.row(r) += ConstVectorMap<S>(g.data(), half).transpose();
        }
      });
}

}  // namespace pkm
