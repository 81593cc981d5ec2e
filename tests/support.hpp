// Test support: an independent, plain-loop reference of the whole layer (brute-force search
// over all n_keys^2 slots) and a central finite-difference gradient checker.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <omp.h>

#include <pkm/pkm.hpp>

namespace pkmtest {

/// Sets the OpenMP thread count for a scope; restores it when the scope ends.
struct ThreadCount {
  int saved = omp_get_max_threads();
  explicit ThreadCount(int n) { omp_set_num_threads(n); }
  ~ThreadCount() { omp_set_num_threads(saved); }
};

inline constexpr float kInf = std::numeric_limits<float>::infinity();
inline constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

using pkm::Index;
using Mat = pkm::RowMatrix<double>;

inline pkm::MemoryConfig small_config() {
  pkm::MemoryConfig c;
  c.input_dim = 6;
  c.heads = 2;
  c.n_keys = 5;
  c.k_dim = 4;
  c.knn = 3;
  c.v_dim = 5;
  c.output_dim = 7;
  return c;
}

/// The bf16 GEMM kernels this CPU runs: portable, and avx512_bf16 where it has AVX512-BF16.
inline std::vector<pkm::Bf16Kernel> bf16_kernels_here() {
  std::vector<pkm::Bf16Kernel> k{pkm::Bf16Kernel::portable};
  if (pkm::bf16_kernel_available(pkm::Bf16Kernel::avx512_bf16))
    k.push_back(pkm::Bf16Kernel::avx512_bf16);
  return k;
}

/// Sets PKM_BF16_KERNEL for its scope.
struct Bf16KernelEnv {
  explicit Bf16KernelEnv(const char* value) { setenv("PKM_BF16_KERNEL", value, 1); }
  ~Bf16KernelEnv() { unsetenv("PKM_BF16_KERNEL"); }
  Bf16KernelEnv(const Bf16KernelEnv&) = delete;
  Bf16KernelEnv& operator=(const Bf16KernelEnv&) = delete;
};

/// For its scope, the layer's bf16 products are bf16 ones on every CPU: where the CPU lacks
/// AVX512-BF16 (and the layer would compute them in fp32) it asks for the emulation.
struct Bf16ProductsHere {
  std::optional<Bf16KernelEnv> emulate;
  Bf16ProductsHere() {
    if (!pkm::bf16_kernel_available(pkm::Bf16Kernel::avx512_bf16)) emulate.emplace("portable");
  }
};

/// A layer big enough for threads and blocks to matter.
inline pkm::MemoryConfig medium_config() {
  pkm::MemoryConfig c;
  c.input_dim = 48;
  c.heads = 4;
  c.n_keys = 32;
  c.k_dim = 16;
  c.knn = 8;
  c.v_dim = 40;
  c.output_dim = 48;
  return c;
}

/// Same shape and the same bytes, element by element.
template <class A, class B>
bool same_bits(const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b) {
  using S = typename A::Scalar;
  static_assert(std::is_same_v<S, typename B::Scalar>, "same_bits: different scalar types");
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  for (Index r = 0; r < a.rows(); ++r) {
    for (Index c = 0; c < a.cols(); ++c) {
      const S x = a(r, c), y = b(r, c);
      if (std::memcmp(&x, &y, sizeof(S)) != 0) return false;
    }
  }
  return true;
}

inline Mat random_matrix(Index rows, Index cols, std::uint64_t seed, double scale = 1.0) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(-scale, scale);
  Mat m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = u(rng);
  return m;
}

struct Reference {
  Mat out;
  pkm::IndexMatrix indices;
  Mat weights;
};

inline double ref_sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

/// The layer computed straight from the formulas in plain loops, searching all n^2 slots.
template <class P, class T>
Reference reference_forward(const pkm::MemoryConfig& c, const P& p, const pkm::ValueTable<T>& V,
                            const Mat& x) {
  const Index B = x.rows(), H = c.heads, n = c.n_keys, k = c.knn, half = c.half(), kd = c.k_dim;
  const double tau = c.effective_qk_norm_scale();
  Reference r;
  r.out.resize(B, c.output_dim);
  r.indices.resize(B, H * k);
  r.weights.resize(B, H * k);
  const auto Wq = p.query_weight();
  const auto K = p.keys();
  for (Index b = 0; b < B; ++b) {
    std::vector<double> q(H * kd);
    for (Index j = 0; j < H * kd; ++j) {
      double s = c.query_bias ? double(p.query_bias()[j]) : 0.0;
      for (Index d = 0; d < c.input_dim; ++d) s += double(Wq(j, d)) * x(b, d);
      q[j] = s;
    }
    std::vector<double> y(c.v_dim, 0.0);
    for (Index h = 0; h < H; ++h) {
      std::vector<double> s[2];
      for (Index t = 0; t < 2; ++t) {
        const double* qh = &q[h * kd + t * half];
        double qn = 1.0;
        if (c.qk_norm) {
          double ss = 0;
          for (Index d = 0; d < half; ++d) ss += qh[d] * qh[d];
          qn = std::sqrt(ss + 1e-6);
        }
        for (Index i = 0; i < n; ++i) {
          const Index row = (2 * h + t) * n + i;
          double dot = 0, kk = 0;
          for (Index d = 0; d < half; ++d) {
            dot += qh[d] * double(K(row, d));
            kk += double(K(row, d)) * double(K(row, d));
          }
          s[t].push_back(c.qk_norm ? tau * dot / (qn * std::sqrt(kk + 1e-6)) : dot);
        }
      }
      // All n^2 candidates, ranked by (sum desc, s1 desc, i asc, s2 desc, j asc).
      std::vector<std::tuple<double, double, Index, double, Index>> all;
      for (Index i = 0; i < n; ++i)
        for (Index j = 0; j < n; ++j)
          all.emplace_back(-(s[0][i] + s[1][j]), -s[0][i], i, -s[1][j], j);
      std::sort(all.begin(), all.end());
      double mx = -std::get<0>(all[0]), z = 0;
      for (Index m = 0; m < k; ++m) z += std::exp(-std::get<0>(all[m]) - mx);
      for (Index m = 0; m < k; ++m) {
        const Index slot = std::get<2>(all[m]) * n + std::get<4>(all[m]);
        const double w = std::exp(-std::get<0>(all[m]) - mx) / z;
        r.indices(b, h * k + m) = slot;
        r.weights(b, h * k + m) = w;
        for (Index d = 0; d < c.v_dim; ++d) y[d] += w * double(V.row(slot)[d]);
      }
    }
    std::vector<double> o(c.output_dim);
    if (c.value_projection) {
      std::vector<double> u = y;
      if (c.memory_plus) {
        for (Index d = 0; d < c.v_dim; ++d) {
          double g = p.swilu_bias()[d];
          for (Index e = 0; e < c.input_dim; ++e) g += double(p.swilu_weight()(d, e)) * x(b, e);
          u[d] = y[d] * g * ref_sigmoid(g);
        }
      }
      for (Index j = 0; j < c.output_dim; ++j) {
        double v = p.value_proj_bias()[j];
        for (Index d = 0; d < c.v_dim; ++d) v += double(p.value_proj_weight()(j, d)) * u[d];
        o[j] = v;
      }
    } else {
      o = y;
    }
    double gate = 1.0;
    if (c.gating) {
      double t = p.gate_bias();
      for (Index e = 0; e < c.input_dim; ++e) t += double(p.gate_weight()[e]) * x(b, e);
      gate = ref_sigmoid(t);
    }
    for (Index j = 0; j < c.output_dim; ++j) r.out(b, j) = gate * o[j];
  }
  return r;
}

/// Loss sum(out * R) of a double layer, and whether the selection equals `indices` (if given).
template <class Layer>
double probe_loss(const Layer& layer, const Mat& x, const Mat& R,
                  const pkm::IndexMatrix* indices = nullptr, bool* same = nullptr) {
  pkm::ForwardCache<double> cache;
  const Mat out = layer.forward(x, cache);
  if (indices && same) *same = (cache.indices == *indices);
  return (out.array() * R.array()).sum();
}

struct FdStats {
  int checked = 0;
  int skipped = 0;  // selection changed under the perturbation
  double max_err = 0;
};

/// Central differences of `loss` in each element of `target` (all, or `max_elems` spread out),
/// compared with `analytic`. `fails` collects descriptions of elements off by more than tol.
template <class Fn>
FdStats check_fd(double* target, Index count, const std::vector<double>& analytic, Fn&& loss,
                 std::vector<std::string>& fails, const std::string& what, Index max_elems = 64,
                 double eps = 1e-6, double tol = 1e-7) {
  FdStats st;
  const Index step = count > max_elems ? (count + max_elems - 1) / max_elems : 1;
  for (Index e = 0; e < count; e += step) {
    const double keep = target[e];
    bool same_p = true, same_m = true;
    target[e] = keep + eps;
    const double lp = loss(&same_p);
    target[e] = keep - eps;
    const double lm = loss(&same_m);
    target[e] = keep;
    if (!same_p || !same_m) {
      ++st.skipped;
      continue;
    }
    const double num = (lp - lm) / (2 * eps);
    const double err = std::abs(num - analytic[e]);
    st.max_err = std::max(st.max_err, err / (1.0 + std::abs(analytic[e])));
    ++st.checked;
    if (err > tol * (1.0 + std::abs(analytic[e])) * 10 + tol) {
      fails.push_back(what + "[" + std::to_string(e) + "]: numeric " + std::to_string(num) +
                      " analytic " + std::to_string(analytic[e]));
    }
  }
  return st;
}

/// "" when two sets of layer gradients hold the same bits, else the name of the first that
/// differs ("values" for the sparse value gradient).
template <class S>
std::string first_gradient_difference(const pkm::LayerGradients<S>& a,
                                      const pkm::LayerGradients<S>& b) {
  for (int t = 0; t < pkm::kNumTensors; ++t) {
    if (!a.params.has(pkm::Tensor(t))) continue;
    if (!same_bits(a.params.matrix(pkm::Tensor(t)), b.params.matrix(pkm::Tensor(t)))) {
      return pkm::tensor_name(pkm::Tensor(t));
    }
  }
  if (a.values.rows != b.values.rows || !same_bits(a.values.values, b.values.values))
    return "values";
  return "";
}

/// Every state tensor of an optimizer (or statistics), copied out.
template <class Opt>
inline std::vector<std::vector<double>> state_of(Opt& opt) {
  std::vector<std::vector<double>> out;
  opt.for_each_state(
      [&](const std::string&, const std::vector<std::int64_t>& shape, auto* data, auto...) {
        std::int64_t n = 1;
        for (auto d : shape) n *= d;
        out.emplace_back(data, data + n);
      });
  return out;
}

}  // namespace pkmtest
