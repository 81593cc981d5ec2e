// The dictd reader and pair builder of the real-data examples (examples/dictd.hpp), on a small
// hand-made dictionary (tests/data/dict/tiny-eng-deu) and on hostile variants of it.
#include <catch2/catch.hpp>

#include <zlib.h>

#include <cstdio>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "../examples/dictd.hpp"

#ifndef PKM_TEST_DATA
#error "PKM_TEST_DATA must name tests/data"
#endif

using Catch::Contains;

namespace {
std::string tiny() { return std::string(PKM_TEST_DATA) + "/dict/tiny-eng-deu"; }

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}
void spit(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

/// A copy of the tiny dictionary under `name` with its index and compressed text replaced by
/// the given bytes (empty: the original's).
std::string variant(const std::string& name, std::string index, std::string dz) {
  const std::string base = "pkm_test_dict_" + name;
  spit(base + ".index", index.empty() ? slurp(tiny() + ".index") : index);
  spit(base + ".dict.dz", dz.empty() ? slurp(tiny() + ".dict.dz") : dz);
  return base;
}
void remove_variant(const std::string& base) {
  std::remove((base + ".index").c_str());
  std::remove((base + ".dict.dz").c_str());
}

std::string gzip(const std::string& text) {
  z_stream z{};
  REQUIRE(deflateInit2(&z, 6, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY) == Z_OK);
  std::string out(deflateBound(&z, uLong(text.size())) + 64, '\0');
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(text.data()));
  z.avail_in = uInt(text.size());
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  z.avail_out = uInt(out.size());
  REQUIRE(deflate(&z, Z_FINISH) == Z_STREAM_END);
  out.resize(z.total_out);
  deflateEnd(&z);
  return out;
}
}  // namespace

TEST_CASE("dictd numbers decode in dictd's base 64, bad ones are refused", "[dictd]") {
  CHECK(dictd::decode_number("A", "t") == 0);
  CHECK(dictd::decode_number("B", "t") == 1);
  CHECK(dictd::decode_number("/", "t") == 63);
  CHECK(dictd::decode_number("BA", "t") == 64);
  CHECK(dictd::decode_number("J4eR", "t") == ((9ull * 64 + 56) * 64 + 30) * 64 + 17);
  CHECK_THROWS_WITH(dictd::decode_number("", "x.index line 3"), Contains("x.index line 3: an empty"));
  CHECK_THROWS_WITH(dictd::decode_number("AB-C", "t"), Contains("not a dictd base-64 number"));
  CHECK_THROWS_WITH(dictd::decode_number("BAAAAAAAAAAAA", "t"), Contains("overflows 64 bits"));
  // 11 digits hold 66 bits: a first digit of at most 15 ("P") still fits in 64.
  CHECK(dictd::decode_number("P//////////", "t") == ~0ull);
  CHECK_THROWS_WITH(dictd::decode_number("Q//////////", "t"), Contains("overflows"));
}

TEST_CASE("UTF-8 is decoded and malformed sequences are refused", "[dictd]") {
  std::u32string out;
  CHECK(dictd::decode_utf8("Straße grün €𝄞", &out));
  CHECK(out == U"Straße grün €𝄞");
  CHECK(dictd::utf8(out) == "Straße grün €𝄞");
  for (const char* bad : {"\xff", "\xc3", "a\xc3(", "\xe2\x82", "\xc0\xaf", "\xed\xa0\x80",
                          "\xf4\x90\x80\x80", "\x80"}) {
    INFO(bad);
    CHECK_FALSE(dictd::decode_utf8(bad));
  }
}

TEST_CASE("the hand-made dictionary reads, and its pairs are the first translations",
          "[dictd]") {
  const dictd::Dictionary d = dictd::open(tiny());
  REQUIRE(d.index.size() == 40);
  CHECK(d.index[1].headword == "house");
  CHECK(d.entry(1) == "house /ipa/\nHaus <neut>\n");
  // The same dictionary named by its index or its text.
  CHECK(dictd::open(tiny() + ".index").index.size() == 40);
  CHECK(dictd::open(tiny() + ".dict.dz").text == d.text);

  CHECK(dictd::first_translation("dog /d/\nHund <masc> [zool.]\n") == "Hund");
  CHECK(dictd::first_translation("car /k/\nAuto <neut>, Wagen <masc>\n") == "Auto");
  CHECK(dictd::first_translation("friend /f/\nFreund <masc>; Freundin <fem>\n") == "Freund");
  CHECK(dictd::first_translation("cup /k/\n1. Tasse <fem>\n2. Pokal\n") == "Tasse");
  CHECK(dictd::first_translation("hello /h/\n(informal) hallo\n") == "hallo");
  CHECK(dictd::first_translation("House /h/ <fem>\n [mus.] house music <n>, house <n>\n") ==
        "house music");
  CHECK(dictd::first_translation("word /w/\n<tag> [x]\n\nWort\n") == "Wort");
  CHECK(dictd::first_translation("only a headword\n") == "");

  std::size_t skipped = 0;
  const auto pairs = dictd::build_pairs(d, 12, &skipped);
  REQUIRE(pairs.size() == 35);
  CHECK(skipped == 3);  // "14" is no word, a 28-letter headword, same -> same
  auto find = [&](const std::u32string& w) -> std::u32string {
    for (const auto& p : pairs)
      if (p.source == w) return p.target;
    return U"(none)";
  };
  CHECK(find(U"house") == U"Haus");
  CHECK(find(U"street") == U"Straße");
  CHECK(find(U"bank") == U"Bank");  // the first of its two entries
  CHECK(find(U"ice cream") == U"Eis");
  CHECK(find(U"cup") == U"Tasse");
  CHECK(find(U"x-ray") == U"Röntgenbild");
  CHECK(find(U"fourteen") == U"(none)");
  CHECK(find(U"same") == U"(none)");
  CHECK(find(U"00-database-info") == U"(none)");
  // A longer limit lets the long word in.
  CHECK(dictd::build_pairs(d, 64).size() == 36);
}

TEST_CASE("hostile dictionaries give clear errors, never a crash", "[dictd][errors]") {
  const std::string index = slurp(tiny() + ".index");
  const std::string dz = slurp(tiny() + ".dict.dz");
  const std::string text = dictd::open(tiny()).text;

  SECTION("a truncated .dict.dz") {
    for (std::size_t keep : {dz.size() - 9, dz.size() / 2, std::size_t(12)}) {
      const std::string base = variant("trunc", "", dz.substr(0, keep));
      CHECK_THROWS_WITH(dictd::open(base), Contains(base + ".dict.dz") && Contains("truncated"));
      remove_variant(base);
    }
  }
  SECTION("a .dict.dz that is not gzip") {
    const std::string base = variant("notgz", "", "this is not compressed at all");
    CHECK_THROWS_WITH(dictd::open(base), Contains("not a valid gzip/dictzip stream"));
    remove_variant(base);
  }
  SECTION("an index entry past the end of the text") {
    const std::string base = variant("past", index + "zebra\tBAAA\tB\n", "");
    const dictd::Dictionary d = dictd::open(base);
    CHECK_THROWS_WITH(d.entry(d.index.size() - 1),
                      Contains("entry 40 ('zebra')") && Contains("past the end of the text"));
    CHECK_THROWS_WITH(dictd::build_pairs(d, 12), Contains("past the end"));
    remove_variant(base);
  }
  SECTION("an offset + length that would wrap") {
    const std::string base = variant("wrap", index + "zebra\tB\tD//////////\n", "");
    const dictd::Dictionary d = dictd::open(base);
    CHECK_THROWS_WITH(d.entry(d.index.size() - 1), Contains("past the end"));
    remove_variant(base);
  }
  SECTION("malformed index lines") {
    for (const char* line : {"no tabs here\n", "one\tB\n", "bad\tB*\tC\n", "bad\t\tC\n"}) {
      INFO(line);
      const std::string base = variant("malformed", index + line, "");
      CHECK_THROWS_WITH(dictd::open(base), Contains(base + ".index line 41"));
      remove_variant(base);
    }
  }
  SECTION("a headword or an entry that is not UTF-8") {
    std::string base = variant("badhead", index + "caf\xe9\tB\tC\n", "");
    CHECK_THROWS_WITH(dictd::open(base), Contains("line 41: the headword is not UTF-8"));
    remove_variant(base);
    const std::string entry = "caf\xe9 /k/\nKaffee\n";
    auto b64 = [](std::uint64_t v) {
      std::string s;
      for (; v > 0; v /= 64)
        s.insert(s.begin(), "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[v % 64]);
      return s;
    };
    base = variant("badtext", index + "cafe\t" + b64(text.size()) + "\t" + b64(entry.size()) + "\n",
                   gzip(text + entry));
    const dictd::Dictionary d = dictd::open(base);
    CHECK_THROWS_WITH(d.entry(40), Contains("entry 40 ('cafe') is not UTF-8"));
    remove_variant(base);
  }
  SECTION("a missing file") {
    CHECK_THROWS_WITH(dictd::open("pkm_test_dict_no_such"),
                      Contains("pkm_test_dict_no_such.index: cannot open"));
  }
}
