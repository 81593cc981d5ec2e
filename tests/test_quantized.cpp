// Quantized value tables (pkm/quantized_table.hpp, pkm/quantized_bag.hpp): each format's rows
// against a plain reference of the documented rule, fp8 rounding against a brute-force search
// over every e4m3 code, the read's kernels against each other (same bits) and against a
// dequantize-then-sum reference in double, thread counts, the layer reading a quantized table,
// and what is refused.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <pkm/memory_layer.hpp>
#include <pkm/quantized_bag.hpp>
#include <pkm/quantized_table.hpp>

#include "support.hpp"

using Catch::Contains;
using pkm::Dtype;
using pkm::Index;
using pkm::QuantKernel;
using pkmtest::same_bits;
using MatF = pkm::RowMatrix<float>;

namespace {

std::vector<QuantKernel> quant_kernels_here() {
  std::vector<QuantKernel> k{QuantKernel::portable};
  for (QuantKernel q : {QuantKernel::avx2, QuantKernel::avx512})
    if (pkm::quant_kernel_available(q)) k.push_back(q);
  return k;
}

/// Sets PKM_QUANT_KERNEL for the scope of a test.
struct QuantKernelEnv {
  explicit QuantKernelEnv(const char* value) { setenv("PKM_QUANT_KERNEL", value, 1); }
  ~QuantKernelEnv() { unsetenv("PKM_QUANT_KERNEL"); }
};

/// Every finite e4m3fn value by brute force: sign, exponent and mantissa fields to a double.
double e4m3_value(int code) {
  const int e = (code >> 3) & 15, m = code & 7;
  const double mag = e == 0 ? m * std::ldexp(1.0, -9) : (1.0 + m / 8.0) * std::ldexp(1.0, e - 7);
  return (code & 0x80) ? -mag : mag;
}

/// The nearest finite e4m3fn code to x (ties to the even code), saturating: a search.
int nearest_e4m3(double x) {
  int best = -1;
  double best_err = 0;
  for (int code = 0; code < 256; ++code) {
    if ((code & 0x7F) == 0x7F) continue;  // NaN
    if ((code & 0x80) && !std::signbit(x)) continue;
    if (!(code & 0x80) && std::signbit(x)) continue;
    const double err = std::fabs(e4m3_value(code) - x);
    if (best < 0 || err < best_err || (err == best_err && (code & 1) == 0)) {
      best = code;
      best_err = err;
    }
  }
  return best;
}

/// The documented rule, written out plainly: the row's values as float after a round trip.
std::vector<double> reference_round_trip(Dtype f, const std::vector<float>& x) {
  double lo = x[0], hi = x[0];
  for (float v : x) {
    lo = std::min(lo, double(v));
    hi = std::max(hi, double(v));
  }
  std::vector<double> out(x.size());
  if (f == Dtype::int8_rowwise) {
    const float s = float((hi - lo) / 255.0), b = float(lo);
    for (std::size_t i = 0; i < x.size(); ++i) {
      const double q = s > 0 ? std::clamp(std::nearbyint((x[i] - double(b)) / s), 0.0, 255.0) : 0;
      out[i] = double(std::fma(s, float(q), b));
    }
  } else if (f == Dtype::int4_rowwise) {
    const float b = float(pkm::fp16(float(lo)));
    float s = float(pkm::fp16(float((hi - b) / 15.0)));
    if (!(s > 0)) s = 1;
    for (std::size_t i = 0; i < x.size(); ++i) {
      const double q = std::clamp(std::nearbyint((x[i] - double(b)) / s), 0.0, 15.0);
      out[i] = double(std::fma(s, float(q), b));
    }
  } else {
    float s = float(std::max(-lo, hi) / 448.0);
    if (!(s > 0)) s = 1;
    for (std::size_t i = 0; i < x.size(); ++i) {
      const int code = nearest_e4m3(double(float(double(x[i]) / s)));
      out[i] = double(std::fma(s, float(e4m3_value(code)), 0.0f));
    }
  }
  return out;
}

std::vector<float> round_trip(Dtype f, const std::vector<float>& x) {
  const Index dim = Index(x.size());
  std::vector<std::uint8_t> row(std::size_t(pkm::quantized_row_bytes(f, dim)), 0xAB);
  pkm::quantize_row(f, x.data(), dim, row.data());
  std::vector<float> back(x.size());
  pkm::dequantize_row(f, row.data(), dim, back.data());
  return back;
}

pkm::ValueTable<float> random_table(Index rows, Index dim, std::uint64_t seed) {
  pkm::ValueTable<float> t(rows, dim);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (Index r = 0; r < rows; ++r) {
    const float scale = std::ldexp(1.0f, int(r % 7) - 3);  // rows of different ranges
    for (Index d = 0; d < dim; ++d) t.row(r)[d] = scale * n(rng) + (r % 3 == 0 ? scale : 0.0f);
  }
  return t;
}

struct Bag {
  pkm::IndexMatrix idx;
  MatF w;
};
Bag random_bag(Index batch, Index bag, Index rows, std::uint64_t seed) {
  Bag b{pkm::IndexMatrix(batch, bag), MatF(batch, bag)};
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<Index> pick(0, rows - 1);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (Index i = 0; i < batch; ++i)
    for (Index l = 0; l < bag; ++l) {
      b.idx(i, l) = pick(rng);
      b.w(i, l) = u(rng);
    }
  return b;
}

}  // namespace

TEST_CASE("fp8 e4m3: encoding is the nearest code found by searching all of them",
          "[quantized]") {
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> expo(-12.0, 9.5);
  std::vector<float> xs = {0.0f, -0.0f, 448.0f, -448.0f, 460.0f, 464.0f, 1e9f, -1e9f,
                           std::ldexp(1.0f, -6), std::ldexp(1.0f, -9), std::ldexp(1.0f, -10),
                           std::ldexp(3.0f, -11), 1.0625f, 1.1875f, 240.0f, 248.0f, 232.0f};
  for (int i = 0; i < 20000; ++i) {
    const double mag = std::exp2(expo(rng));
    xs.push_back(float(i % 2 ? -mag : mag));
  }
  for (int code = 0; code < 256; ++code) {  // every code, and every midpoint between codes
    if ((code & 0x7F) == 0x7F) continue;
    xs.push_back(float(e4m3_value(code)));
    if ((code & 0x7F) < 0x7E) xs.push_back(float((e4m3_value(code) + e4m3_value(code + 1)) / 2));
  }
  for (float x : xs) {
    INFO("x = " << x);
    REQUIRE(int(pkm::detail::float_to_e4m3(x)) == nearest_e4m3(double(x)));
  }
  for (int code = 0; code < 256; ++code) {
    const float v = pkm::detail::e4m3_to_float(std::uint8_t(code));
    if ((code & 0x7F) == 0x7F) {
      CHECK(std::isnan(v));
    } else {
      CHECK(double(v) == e4m3_value(code));
      // The kernels' widening: the same value times 2^-8.
      const auto h = Eigen::numext::bit_cast<pkm::fp16>(pkm::detail::e4m3_as_f16_bits(std::uint8_t(code)));
      CHECK(double(float(h)) * 256.0 == e4m3_value(code));
    }
  }
  CHECK(pkm::detail::e4m3_to_float(0x7E) == 448.0f);
}

TEST_CASE("quantize_row: each format against the plain reference of its rule", "[quantized]") {
  std::mt19937_64 rng(3);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (Dtype f : pkm::kQuantizedDtypes) {
    for (Index dim : {1, 2, 3, 7, 16, 33, 64, 255, 1024}) {
      for (float scale : {1e-3f, 1.0f, 100.0f}) {
        std::vector<float> x(static_cast<std::size_t>(dim));
        for (auto& v : x) v = scale * n(rng) + 0.5f * scale;
        INFO(pkm::dtype_name(f) << " dim " << dim << " scale " << scale);
        const std::vector<float> got = round_trip(f, x);
        const std::vector<double> want = reference_round_trip(f, x);
        double lo = x[0], hi = x[0];
        for (float v : x) {
          lo = std::min(lo, double(v));
          hi = std::max(hi, double(v));
        }
        for (Index d = 0; d < dim; ++d) {
          REQUIRE(double(got[std::size_t(d)]) == want[std::size_t(d)]);
          // And the error the format promises.
          const double err = std::fabs(double(got[std::size_t(d)]) - x[std::size_t(d)]);
          if (f == Dtype::int8_rowwise) {
            CHECK(err <= (hi - lo) / 255.0 * 0.5001 + 1e-6 * std::fabs(hi));
          } else if (f == Dtype::int4_rowwise) {
            CHECK(err <= (hi - lo) / 15.0 * 0.55 + 1e-3 * std::max(std::fabs(lo), std::fabs(hi)));
          } else {
            const double amax = std::max(-lo, hi);
            CHECK(err <= std::fabs(double(x[std::size_t(d)])) / 16.0 + amax * std::ldexp(1.0, -18));
          }
        }
      }
    }
  }
}

TEST_CASE("quantize_row: rows of equal values, zeros, extreme ranges", "[quantized]") {
  for (Dtype f : pkm::kQuantizedDtypes) {
    INFO(pkm::dtype_name(f));
    for (Index dim : {1, 5, 64}) {
      for (float v : {0.0f, 0.1f, -3.5f, 1000.0f}) {
        const std::vector<float> x(std::size_t(dim), v);
        const std::vector<float> got = round_trip(f, x);
        for (float g : got) {
          if (f == Dtype::int8_rowwise)
            CHECK(g == v);  // bias = v, scale = 0
          else if (f == Dtype::int4_rowwise)  // bias = fp16(v), the rest in a tiny fp16 scale
            CHECK(std::fabs(g - v) <= std::fabs(v) * std::ldexp(1.0f, -11));
          else
            CHECK(std::fabs(g - v) <= std::fabs(v) * 1e-6f);  // 448 * (|v| / 448)
        }
      }
    }
  }
  // int8 keeps fp32 scale and bias: the whole float range.
  const std::vector<float> wide = {-3e38f, 3e38f, 0.0f, 1e-30f};
  const std::vector<float> w8 = round_trip(Dtype::int8_rowwise, wide);
  for (float g : w8) CHECK(std::isfinite(g));
  CHECK(w8[0] == -3e38f);
  CHECK(std::fabs(w8[1] - 3e38f) <= 3e38f / 255);
  // fp8 too: values far below the row's largest flush to zero, the largest stays.
  const std::vector<float> w_fp8 = round_trip(Dtype::fp8_rowwise, wide);
  CHECK(std::fabs(w_fp8[1] - 3e38f) <= 3e38f * 1e-6f);
  CHECK(w_fp8[3] == 0.0f);
  // int4 keeps fp16 scale and bias: values beyond +-65504 are refused.
  std::vector<std::uint8_t> row(64, 0x5A);
  const std::vector<std::uint8_t> before = row;
  const std::vector<float> big = {1.0f, 70000.0f};
  CHECK_THROWS_WITH(pkm::quantize_row(Dtype::int4_rowwise, big.data(), 2, row.data()),
                    Contains("65504") && Contains("int8"));
  CHECK(row == before);
  const std::vector<float> tiny = {0.0f, 1e-9f};  // a range below fp16's: scale 1, all q = 0
  const std::vector<float> t4 = round_trip(Dtype::int4_rowwise, tiny);
  CHECK(t4[0] == 0.0f);
  CHECK(t4[1] == 0.0f);
}

TEST_CASE("quantize_row and quantize refuse NaN and infinities, writing nothing", "[quantized]") {
  for (Dtype f : pkm::kQuantizedDtypes) {
    for (float bad : {pkmtest::kNaN, pkmtest::kInf, -pkmtest::kInf}) {
      std::vector<float> x = {1.0f, 2.0f, bad, 3.0f};
      std::vector<std::uint8_t> row(32, 0x77);
      const auto before = row;
      CHECK_THROWS_AS(pkm::quantize_row(f, x.data(), 4, row.data()), std::invalid_argument);
      CHECK_THROWS_WITH(pkm::quantize_row(f, x.data(), 4, row.data()), Contains("column 2"));
      CHECK(row == before);
    }
    pkm::ValueTable<float> t = random_table(3000, 9, 1);
    t.row(2100)[4] = pkmtest::kNaN;
    t.row(2900)[0] = pkmtest::kInf;
    const std::vector<float> copy(t.data(), t.data() + 3000 * 9);
    CHECK_THROWS_WITH(pkm::quantize(t, f), Contains("row 2100") && Contains("NaN"));
    CHECK(std::memcmp(copy.data(), t.data(), copy.size() * 4) == 0);
  }
  pkm::ValueTable<float> t(4, 4);
  CHECK_THROWS_WITH(pkm::quantize(t, Dtype::bf16), Contains("BF16") && Contains("INT8_ROWWISE"));
}

TEST_CASE("QuantizedTable: sizes, views, strides and the layouts' bytes", "[quantized]") {
  CHECK(pkm::quantized_row_bytes(Dtype::int8_rowwise, 1024) == 1032);
  CHECK(pkm::quantized_row_bytes(Dtype::int4_rowwise, 1024) == 516);
  CHECK(pkm::quantized_row_bytes(Dtype::int4_rowwise, 7) == 8);
  CHECK(pkm::quantized_row_bytes(Dtype::fp8_rowwise, 1024) == 1028);
  CHECK_THROWS_AS(pkm::quantized_row_bytes(Dtype::f32, 4), std::invalid_argument);
  CHECK_THROWS_AS(pkm::quantized_row_bytes(Dtype::int8_rowwise, 0), std::invalid_argument);
  pkm::QuantizedTable t(Dtype::int4_rowwise, 10, 7);
  CHECK(t.stride() == 8);
  CHECK(t.bytes() == 80);
  CHECK(t.owns_storage());
  pkm::QuantizedTable v = t.view();
  CHECK(!v.owns_storage());
  CHECK(v.data() == t.data());
  pkm::QuantizedTable c = t;  // a copy of an owning table owns a copy
  CHECK(c.data() != t.data());
  std::vector<std::uint8_t> mem(100);
  CHECK_THROWS_WITH(pkm::QuantizedTable::view(Dtype::int8_rowwise, mem.data(), 10, 4, 11),
                    Contains("stride = 11") && Contains("12 bytes"));
  CHECK_THROWS_AS(pkm::QuantizedTable::view(Dtype::int8_rowwise, nullptr, 1, 4),
                  std::invalid_argument);
  CHECK_THROWS_AS(pkm::QuantizedTable(Dtype::int8_rowwise, std::int64_t(1) << 40, 1 << 24),
                  std::invalid_argument);
  CHECK_THROWS_AS(pkm::QuantizedTable(Dtype::f16, 4, 4), std::invalid_argument);
  // The byte layouts: int8 codes then fp32 scale and bias; int4 low nibble first, then fp16
  // scale and bias; fp8 codes then an fp32 scale.
  const std::vector<float> x = {0.0f, 1.0f, 2.0f};
  std::vector<std::uint8_t> r8(11), r4(6), r_fp8(7);
  pkm::quantize_row(Dtype::int8_rowwise, x.data(), 3, r8.data());
  CHECK(r8[0] == 0);
  CHECK(r8[1] == int(std::nearbyint(1.0 / double(2.0f / 255.0f))));
  CHECK(r8[2] == 255);
  CHECK(pkm::detail::load_f32(r8.data() + 3) == 2.0f / 255.0f);
  CHECK(pkm::detail::load_f32(r8.data() + 7) == 0.0f);
  pkm::quantize_row(Dtype::int4_rowwise, x.data(), 3, r4.data());
  const float s4 = float(pkm::fp16(2.0f / 15.0f));
  CHECK(r4[0] == ((int(std::nearbyint(1.0 / s4)) << 4) | 0));
  CHECK(r4[1] == std::min(15, int(std::nearbyint(2.0 / s4))));
  CHECK(pkm::detail::load_f16(r4.data() + 2) == s4);
  CHECK(pkm::detail::load_f16(r4.data() + 4) == 0.0f);
  pkm::quantize_row(Dtype::fp8_rowwise, x.data(), 3, r_fp8.data());
  CHECK(r_fp8[2] == 0x7E);  // the row's largest is 448
  CHECK(pkm::detail::load_f32(r_fp8.data() + 3) == float(2.0 / 448.0));
}

TEST_CASE("quantized read: every kernel gives the portable kernel's bits and the reference's sums",
          "[quantized]") {
  const auto kernels = quant_kernels_here();
  INFO("kernels here: " << kernels.size());
  for (Dtype f : pkm::kQuantizedDtypes) {
    for (Index dim : {1, 7, 8, 16, 33, 64, 100, 256, 300, 1024}) {
      const Index rows = 97;
      const pkm::ValueTable<float> t = random_table(rows, dim, std::uint64_t(dim));
      const pkm::QuantizedTable q = pkm::quantize(t, f);
      const pkm::ValueTable<float> deq = pkm::dequantize(q);
      for (Index bag : {1, 5, 32}) {
        const Bag b = random_bag(6, bag, rows, std::uint64_t(bag * 31 + dim));
        MatF ref(6, dim), out(6, dim);
        pkm::embedding_bag(q, b.idx, b.w, ref, QuantKernel::portable);
        for (QuantKernel k : kernels) {
          INFO(pkm::dtype_name(f) << " dim " << dim << " bag " << bag << " kernel "
                                  << pkm::quant_kernel_name(k));
          out.setConstant(-1);
          pkm::embedding_bag(q, b.idx, b.w, out, k);
          REQUIRE(same_bits(out, ref));
        }
        // Against dequantize-then-sum in double: within float rounding of the magnitudes.
        for (Index i = 0; i < 6; ++i) {
          for (Index d = 0; d < dim; ++d) {
            double s = 0, mag = 0;
            for (Index l = 0; l < bag; ++l) {
              const double v = double(b.w(i, l)) * double(deq.row(b.idx(i, l))[d]);
              s += v;
              mag += std::fabs(v) + std::fabs(double(b.w(i, l)) * q.scale(b.idx(i, l)).bias);
            }
            INFO(pkm::dtype_name(f) << " dim " << dim << " bag " << bag << " (" << i << ", " << d
                                    << ")");
            REQUIRE(std::fabs(double(ref(i, d)) - s) <= (bag + 3) * 1.2e-7 * mag + 1e-30);
          }
        }
      }
    }
  }
}

TEST_CASE("quantized read: the same bits with any thread count, strided views too",
          "[quantized]") {
  const Index rows = 500, dim = 200;
  const pkm::ValueTable<float> t = random_table(rows, dim, 9);
  for (Dtype f : pkm::kQuantizedDtypes) {
    const pkm::QuantizedTable q = pkm::quantize(t, f);
    // The same rows in a table with padding between rows.
    const Index stride = q.row_bytes() + 13;
    std::vector<std::uint8_t> padded(std::size_t(rows * stride), 0xEE);
    for (Index r = 0; r < rows; ++r) std::memcpy(&padded[std::size_t(r * stride)], q.row(r), std::size_t(q.row_bytes()));
    const auto pv = pkm::QuantizedTable::view(f, padded.data(), rows, dim, stride);
    const Bag b = random_bag(333, 64, rows, 5);
    MatF one(333, dim), two(333, dim), strided(333, dim);
    {
      pkmtest::ThreadCount t1(1);
      pkm::embedding_bag(q, b.idx, b.w, one);
    }
    {
      pkmtest::ThreadCount t2(2);
      pkm::embedding_bag(q, b.idx, b.w, two);
      pkm::embedding_bag(pv, b.idx, b.w, strided);
    }
    CHECK(same_bits(one, two));
    CHECK(same_bits(one, strided));
  }
}

TEST_CASE("quantized read: bad arguments are refused before anything is written",
          "[quantized]") {
  const pkm::QuantizedTable q = pkm::quantize(random_table(10, 8, 1), Dtype::int8_rowwise);
  Bag b = random_bag(2, 3, 10, 1);
  MatF out = MatF::Constant(2, 8, 5.0f);
  const MatF before = out;
  b.idx(1, 2) = 10;
  CHECK_THROWS_AS(pkm::embedding_bag(q, b.idx, b.w, out), std::out_of_range);
  b.idx(1, 2) = -1;
  CHECK_THROWS_AS(pkm::embedding_bag(q, b.idx, b.w, out), std::out_of_range);
  b.idx(1, 2) = 0;
  MatF wrong(2, 7);
  CHECK_THROWS_AS(pkm::embedding_bag(q, b.idx, b.w, wrong), std::invalid_argument);
  MatF wrong_w(2, 4);
  CHECK_THROWS_AS(pkm::embedding_bag(q, b.idx, wrong_w, out), std::invalid_argument);
  CHECK(same_bits(out, before));
  {
    QuantKernelEnv env("avx1024");
    CHECK_THROWS_WITH(pkm::quant_kernel(), Contains("avx1024") && Contains("portable"));
  }
  {
    QuantKernelEnv env("portable");
    CHECK(pkm::quant_kernel() == QuantKernel::portable);
  }
}

TEST_CASE("first_invalid_row and the read name rows whose scale is NaN or whose fp8 code is NaN",
          "[quantized]") {
  for (Dtype f : pkm::kQuantizedDtypes) {
    pkm::QuantizedTable q = pkm::quantize(random_table(2000, 16, 4), f);
    CHECK(pkm::first_invalid_row(q) == -1);
    const float nan = pkmtest::kNaN;
    std::uint8_t* tail = q.row(1500) + (f == Dtype::int4_rowwise ? 8 : 16);
    if (f == Dtype::int4_rowwise) {
      pkm::detail::store_f16(tail, nan);
    } else {
      pkm::detail::store_f32(tail, nan);
    }
    CHECK(pkm::first_invalid_row(q) == 1500);
    pkm::IndexMatrix idx(2, 2);
    idx << 1, 2, 3, 1500;
    MatF w = MatF::Constant(2, 2, 0.5f), out(2, 16);
    pkm::embedding_bag(q, idx, w, out);
    CHECK_THROWS_WITH(pkm::detail::check_bag_read("read", q, idx, out),
                      Contains("row 1500") && Contains("token 1"));
  }
  pkm::QuantizedTable q = pkm::quantize(random_table(100, 16, 4), Dtype::fp8_rowwise);
  q.row(70)[3] = 0xFF;
  CHECK(pkm::first_invalid_row(q) == 70);
}

TEST_CASE("quantized layer: forward near the fp32 layer's, bits of the quantized read, "
          "backward refused",
          "[quantized]") {
  const pkm::MemoryConfig c = pkmtest::medium_config();
  pkm::MemoryLayer<float> full(c, 11);
  const MatF x = pkmtest::random_matrix(40, c.input_dim, 3).cast<float>();
  pkm::ForwardCache<float> cf, cq;
  const MatF y_full = full.forward(x, cf);
  const double tol[] = {0.02, 0.15, 0.06};  // int8, int4, fp8: relative error of the output
  int i = 0;
  for (Dtype f : pkm::kQuantizedDtypes) {
    INFO(pkm::dtype_name(f));
    pkm::QuantizedTable q = pkm::quantize(full.values(), f);
    pkm::MemoryLayer<float, pkm::Quantized> layer(full.params(), q.view());
    const MatF y = layer.forward(x, cq);
    const double rel = (y - y_full).norm() / y_full.norm();
    CHECK(rel < tol[i++]);
    CHECK(rel > 0);
    // The search is the fp32 layer's; the read is the quantized read of the same slots.
    CHECK(cq.indices == cf.indices);
    MatF read(40, c.v_dim);
    pkm::embedding_bag(q, cq.indices, cq.weights, read);
    CHECK(same_bits(read, cq.read));
    // Training is refused, with nothing changed.
    pkm::LayerGradients<float> g(c);
    const MatF dout = MatF::Ones(40, c.output_dim);
    const std::vector<std::uint8_t> bytes(q.data(), q.data() + q.bytes());
    CHECK_THROWS_WITH(layer.backward(x, cq, dout, g),
                      Contains(pkm::dtype_name(f)) && Contains("inference only"));
    CHECK(g.values.empty());
    CHECK(std::memcmp(bytes.data(), q.data(), bytes.size()) == 0);
    // A table of the wrong shape is refused at construction.
    pkm::QuantizedTable small(f, c.slots(), c.v_dim - 1);
    using QuantizedLayer = pkm::MemoryLayer<float, pkm::Quantized>;
    CHECK_THROWS_AS(QuantizedLayer(full.params(), std::move(small)), std::invalid_argument);
  }
}

TEST_CASE("a quantized table shared by two layers, read from several threads at once, with bf16 "
          "products",
          "[quantized]") {
  const pkm::MemoryConfig c = pkmtest::medium_config();
  pkm::MemoryLayer<float> a(c, 21), b(c, 22);
  const pkm::QuantizedTable pool = pkm::quantize(a.values(), Dtype::fp8_rowwise);
  // Two layers, their own dense parameters, one table (views: no copy).
  const pkm::MemoryLayer<float, pkm::Quantized> qa(a.params(), pool.view()), qb(b.params(), pool.view());
  CHECK(qa.values().data() == pool.data());
  CHECK(qb.values().data() == pool.data());
  const MatF x = pkmtest::random_matrix(24, c.input_dim, 4).cast<float>();
  pkm::ForwardCache<float> ca, cb;
  const MatF ya = qa.forward(x, ca), yb = qb.forward(x, cb);
  CHECK(!same_bits(ya, yb));
  // The const forward from four threads at once, each with its own cache: the same bits.
  std::vector<MatF> outs(4);
  std::vector<std::thread> pool_threads;
  for (int t = 0; t < 4; ++t) {
    pool_threads.emplace_back([&, t] {
      pkm::ForwardCache<float> cache;
      outs[std::size_t(t)] = (t % 2 ? qb : qa).forward(x, cache);
    });
  }
  for (auto& th : pool_threads) th.join();
  for (int t = 0; t < 4; ++t) CHECK(same_bits(outs[std::size_t(t)], t % 2 ? yb : ya));
  // bf16 products with a quantized table: the products change (bf16 query), the read is the
  // quantized read of the slots that query found.
  pkm::LayerParameters<float> p16 = a.params();
  p16.set_compute(Dtype::bf16);
  setenv("PKM_BF16_KERNEL", "portable", 1);  // bf16 products on any CPU
  const pkm::MemoryLayer<float, pkm::Quantized> q16(std::move(p16), pool.view());
  pkm::ForwardCache<float> c16;
  const MatF y16 = q16.forward(x, c16);
  unsetenv("PKM_BF16_KERNEL");
  CHECK(!same_bits(y16, ya));
  CHECK(y16.allFinite());
  MatF read(24, c.v_dim);
  pkm::embedding_bag(pool, c16.indices, c16.weights, read);
  CHECK(same_bits(read, c16.read));
}
