#include <catch2/catch.hpp>

#include <limits>
#include <string>

#include <pkm/pkm.hpp>

#include "support.hpp"

using Catch::Matchers::Contains;

namespace {
// Expects validate() to throw std::invalid_argument mentioning every string in `words`.
void expect_invalid(const pkm::MemoryConfig& c, std::initializer_list<const char*> words) {
  try {
    c.validate();
    FAIL("validate() accepted an invalid config");
  } catch (const std::invalid_argument& e) {
    const std::string msg = e.what();
    for (const char* w : words) {
      INFO("message: " << msg);
      CHECK_THAT(msg, Contains(w));
    }
  }
}
}  // namespace

TEST_CASE("a valid config passes and derives its sizes", "[config]") {
  pkm::MemoryConfig c = pkmtest::small_config();
  REQUIRE_NOTHROW(c.validate());
  CHECK(c.half() == 2);
  CHECK(c.slots() == 25);
  CHECK(c.bag_size() == 6);
  CHECK(c.effective_qk_norm_scale() == Approx(std::sqrt(2.0)));
  c.qk_norm_scale = 3.0;
  CHECK(c.effective_qk_norm_scale() == 3.0);
  c.knn = c.n_keys;  // knn = n_keys is allowed
  REQUIRE_NOTHROW(c.validate());
}

TEST_CASE("every invalid config field is rejected with its name and range", "[config][errors]") {
  const pkm::MemoryConfig good = pkmtest::small_config();
  auto with = [&](auto edit) {
    pkm::MemoryConfig c = good;
    edit(c);
    return c;
  };
  expect_invalid(with([](auto& c) { c.input_dim = 0; }), {"input_dim", "0", "1 <= input_dim"});
  expect_invalid(with([](auto& c) { c.input_dim = -3; }), {"input_dim", "-3"});
  expect_invalid(with([](auto& c) { c.heads = 0; }), {"heads", "1 <= heads"});
  expect_invalid(with([](auto& c) { c.n_keys = 0; }), {"n_keys", "1 <= n_keys"});
  expect_invalid(with([](auto& c) { c.n_keys = pkm::kMaxKeys + 1; }), {"n_keys"});
  expect_invalid(with([](auto& c) { c.k_dim = 0; }), {"k_dim", "2 <= k_dim"});
  expect_invalid(with([](auto& c) { c.k_dim = 5; }), {"k_dim = 5", "even"});
  expect_invalid(with([](auto& c) { c.knn = 0; }), {"knn = 0", "1 <= knn <= 5"});
  expect_invalid(with([](auto& c) { c.knn = 6; }), {"knn = 6", "knn <= 5"});
  expect_invalid(with([](auto& c) { c.v_dim = 0; }), {"v_dim", "1 <= v_dim"});
  expect_invalid(with([](auto& c) { c.output_dim = 0; }), {"output_dim", "1 <= output_dim"});
  expect_invalid(with([](auto& c) {
                   c.heads = 4096;
                   c.k_dim = 1 << 14;
                 }),
                 {"heads * k_dim"});
  expect_invalid(with([](auto& c) { c.value_projection = false; }),
                 {"memory_plus", "value_projection"});
  expect_invalid(with([](auto& c) {
                   c.memory_plus = false;
                   c.value_projection = false;
                 }),
                 {"output_dim = 7", "v_dim = 5", "value_projection = false"});
  expect_invalid(with([](auto& c) { c.qk_norm_scale = 0.0; }), {"qk_norm_scale", "> 0"});
  expect_invalid(with([](auto& c) { c.score_activation = static_cast<pkm::ScoreActivation>(7); }),
                 {"score_activation = 7", "softmax (0) or relu (1)"});
  expect_invalid(with([](auto& c) { c.qk_norm_scale = -1.0; }), {"qk_norm_scale"});
  expect_invalid(with([](auto& c) { c.qk_norm_scale = std::numeric_limits<double>::quiet_NaN(); }),
                 {"qk_norm_scale", "finite"});
}

TEST_CASE("layers and parameter sets refuse an invalid config", "[config][errors]") {
  pkm::MemoryConfig c = pkmtest::small_config();
  c.k_dim = 3;
  CHECK_THROWS_AS(pkm::MemoryLayer<float>(c, 1), std::invalid_argument);
  CHECK_THROWS_AS(pkm::LayerParameters<float>(c), std::invalid_argument);
  CHECK_THROWS_AS(pkm::LayerGradients<float>(c), std::invalid_argument);
}

TEST_CASE("one vocabulary of element types and one version", "[config][dtype]") {
  for (pkm::Dtype d : pkm::kDtypes) {
    INFO(pkm::dtype_name(d));
    CHECK(pkm::parse_dtype(pkm::dtype_name(d)) == d);
    CHECK(pkm::dtype_size(d) > 0);
  }
  CHECK(!pkm::parse_dtype("Q8"));
  CHECK(pkm::dtype_of<float>() == pkm::Dtype::f32);
  CHECK(pkm::dtype_of<pkm::bf16>() == pkm::Dtype::bf16);
  CHECK(pkm::dtype_of<pkm::fp16>() == pkm::Dtype::f16);
  CHECK(pkm::dtype_of<double>() == pkm::Dtype::f64);
  CHECK(pkm::dtype_of<std::int64_t>() == pkm::Dtype::i64);
  CHECK(pkm::dtype_size(pkm::dtype_of<pkm::bf16>()) == sizeof(pkm::bf16));
  CHECK(pkm::is_float(pkm::Dtype::bf16));
  CHECK(!pkm::is_float(pkm::Dtype::i32));
  CHECK(std::string(PKM_VERSION_STRING) == std::to_string(PKM_VERSION_MAJOR) + "." +
                                               std::to_string(PKM_VERSION_MINOR) + "." +
                                               std::to_string(PKM_VERSION_PATCH));
}

TEST_CASE("the error rule's helpers: kinds travel and come back as the same exception type",
          "[config][errors]") {
  auto kind_of = [](auto e) { return pkm::error_kind(std::make_exception_ptr(e)); };
  CHECK(kind_of(std::invalid_argument("a")) == pkm::ErrorKind::invalid_argument);
  CHECK(kind_of(std::out_of_range("a")) == pkm::ErrorKind::out_of_range);
  CHECK(kind_of(std::runtime_error("a")) == pkm::ErrorKind::runtime_error);
  CHECK(kind_of(std::logic_error("a")) == pkm::ErrorKind::runtime_error);
  CHECK_THROWS_AS(pkm::throw_error(pkm::ErrorKind::out_of_range, "m"), std::out_of_range);
  CHECK_THROWS_AS(pkm::throw_error(pkm::ErrorKind::invalid_argument, "m"), std::invalid_argument);
  CHECK_THROWS_AS(pkm::throw_error(pkm::ErrorKind::runtime_error, "m"), std::runtime_error);
  CHECK(pkm::expected_message("pkm::f", "lr", "-1", "a finite lr >= 0") ==
        "pkm::f: lr = -1, expected a finite lr >= 0");
  CHECK_THROWS_WITH(pkm::optim::AdamOptions{-1.0}.validate("pkm::optim::AdamW"),
                    Contains("pkm::optim::AdamW: lr = -1.000000, expected a finite lr >= 0"));
}
