// Continual learning: slot statistics against a brute-force count, slot ranking against a
// plain reference, row masks honoured by every sparse optimizer and the fused backward
// (masked rows bitwise unchanged, state included), statistics save/load, and bad input.
#include <catch2/catch.hpp>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <type_traits>
#include <vector>

#include <pkm/io/safetensors.hpp>
#include <pkm/io/slot_statistics.hpp>
#include <pkm/pkm.hpp>

#include "support.hpp"

namespace {

using pkm::Index;
using MatF = pkm::RowMatrix<float>;
using pkmtest::same_bits;

/// A cache as a forward of a layer with n_keys^2 slots leaves it, with the given reads (one
/// row of slot ids per token) and weights 1/(k+1) for the k-th read of a token.
pkm::ForwardCache<float> crafted_cache(Index n_keys,
                                       const std::vector<std::vector<std::int64_t>>& reads) {
  pkm::ForwardCache<float> c;
  c.config = pkmtest::small_config();
  c.config.n_keys = n_keys;
  c.batch = Index(reads.size());
  const Index bag = reads.empty() ? 1 : Index(reads[0].size());
  c.indices.resize(c.batch, bag);
  c.weights.resize(c.batch, bag);
  for (Index b = 0; b < c.batch; ++b) {
    for (Index k = 0; k < bag; ++k) {
      c.indices(b, k) = reads[std::size_t(b)][std::size_t(k)];
      c.weights(b, k) = 1.0f / float(k + 1);
    }
  }
  return c;
}

struct Brute {
  std::vector<std::int64_t> count, docs;
  std::vector<double> mass;
  std::int64_t documents = 0;
  explicit Brute(Index slots)
      : count(std::size_t(slots)), docs(std::size_t(slots)), mass(std::size_t(slots)) {}
  void add(const std::vector<const pkm::ForwardCache<float>*>& caches) {
    std::vector<char> seen(count.size(), 0);
    for (const auto* c : caches) {
      for (Index b = 0; b < c->indices.rows(); ++b) {
        for (Index k = 0; k < c->indices.cols(); ++k) {
          const auto s = std::size_t(c->indices(b, k));
          ++count[s];
          mass[s] += double(c->weights(b, k));
          seen[s] = 1;
        }
      }
    }
    for (std::size_t s = 0; s < seen.size(); ++s) docs[s] += seen[s];
    ++documents;
  }
};

void check_equal(const pkm::SlotStatistics& st, const Brute& ref) {
  CHECK(st.documents() == ref.documents);
  CHECK(st.counts() == ref.count);
  CHECK(st.document_counts() == ref.docs);
  REQUIRE(st.mass().size() == ref.mass.size());
  for (std::size_t s = 0; s < ref.mass.size(); ++s) CHECK(st.mass()[s] == ref.mass[s]);
}

}  // namespace

TEST_CASE(
    "slot statistics equal a brute-force count over the caches, across layers, threads and merges",
    "[continual][stats]") {
  const auto c = pkmtest::medium_config();
  pkm::MemoryLayer<float> a(c, 3), b(c, 4);  // two layers reading tables of the same slots
  pkm::SlotStatistics st(c.slots(), true), first(c.slots(), true), second(c.slots(), true);
  Brute ref(c.slots());
  const int saved = omp_get_max_threads();
  for (int batch = 0; batch < 6; ++batch) {
    omp_set_num_threads(1 + batch % 2);
    const MatF x = pkmtest::random_matrix(37 + 11 * batch, c.input_dim, 50 + batch).cast<float>();
    pkm::ForwardCache<float> ca, cb;
    a.forward(x, ca);
    b.forward(x, cb);
    if (batch % 3 == 0) {  // one batch through one layer
      st.add(ca);
      ref.add({&ca});
      (batch < 3 ? first : second).add(ca);
    } else {  // one batch through two layers sharing the table: one document
      st.add(std::vector<const pkm::ForwardCache<float>*>{&ca, &cb});
      ref.add({&ca, &cb});
      (batch < 3 ? first : second).add(std::vector<const pkm::ForwardCache<float>*>{&ca, &cb});
    }
  }
  omp_set_num_threads(saved);
  check_equal(st, ref);
  std::int64_t total = 0;
  for (auto n : ref.count) total += n;
  CHECK(st.total_reads() == total);

  // Statistics gathered apart (two threads, two processes) and merged: the same counts, the
  // same mass up to the order of the additions.
  first.merge(second);
  CHECK(first.counts() == st.counts());
  CHECK(first.document_counts() == st.document_counts());
  CHECK(first.documents() == st.documents());
  CHECK(first.total_reads() == st.total_reads());
  for (std::size_t s = 0; s < ref.mass.size(); ++s)
    CHECK(first.mass()[s] == Approx(ref.mass[s]).epsilon(1e-12));

  // The summaries against direct computations.
  Index used = 0;
  double h = 0, hm = 0, mass_total = 0;
  for (double m : ref.mass) mass_total += m;
  for (std::size_t s = 0; s < ref.count.size(); ++s) {
    used += ref.count[s] > 0;
    if (ref.count[s] > 0) {
      const double p = double(ref.count[s]) / double(total), pm = ref.mass[s] / mass_total;
      h -= p * std::log(p);
      hm -= pm * std::log(pm);
    }
  }
  CHECK(st.used_fraction() == Approx(double(used) / double(c.slots())));
  CHECK(st.entropy() == Approx(h).epsilon(1e-12));
  CHECK(st.kl_to_uniform() == Approx(std::log(double(c.slots())) - h).epsilon(1e-12));
  CHECK(st.entropy(pkm::SlotMeasure::mass) == Approx(hm).epsilon(1e-12));
  std::vector<std::int64_t> order(ref.count.size());
  for (std::size_t s = 0; s < order.size(); ++s) order[s] = std::int64_t(s);
  std::stable_sort(order.begin(), order.end(),
                   [&](auto x, auto y) { return ref.count[x] > ref.count[y]; });
  const auto top = st.top(10);
  REQUIRE(top.size() == 10);
  for (std::size_t i = 0; i < top.size(); ++i) {
    CHECK(top[i].first == order[i]);
    CHECK(top[i].second == double(ref.count[std::size_t(order[i])]));
  }
  std::map<std::size_t, std::int64_t> hist;
  for (auto n : ref.count) hist[n == 0 ? 0 : std::size_t(std::floor(std::log2(double(n)))) + 1]++;
  const auto hs = st.histogram();
  std::int64_t in_hist = 0;
  for (std::size_t bkt = 0; bkt < hs.size(); ++bkt) {
    CHECK(hs[bkt] == hist[bkt]);
    in_hist += hs[bkt];
  }
  CHECK(in_hist == c.slots());
  CHECK(hs.back() > 0);
}

TEST_CASE("slot statistics summaries at the extremes", "[continual][stats]") {
  pkm::SlotStatistics none(9);
  CHECK(none.used_fraction() == 0.0);
  CHECK(none.entropy() == 0.0);
  CHECK(none.kl_to_uniform() == 0.0);
  CHECK(none.histogram() == std::vector<std::int64_t>{9});
  // One slot takes every read: KL to uniform is log(slots).
  pkm::SlotStatistics one(9);
  one.add(crafted_cache(3, {{4}, {4}, {4}}));
  CHECK(one.kl_to_uniform() == Approx(std::log(9.0)));
  CHECK(one.histogram() == std::vector<std::int64_t>{8, 0, 1});  // 3 reads: bucket [2, 4)
  // Every slot read equally: KL 0.
  pkm::SlotStatistics flat(9);
  flat.add(crafted_cache(3, {{0, 1, 2}, {3, 4, 5}, {6, 7, 8}}));
  CHECK(flat.kl_to_uniform() == Approx(0.0).margin(1e-12));
  CHECK(flat.used_fraction() == 1.0);
  CHECK_THROWS_AS(flat.top(-1), std::invalid_argument);
  CHECK_THROWS_WITH(flat.entropy(pkm::SlotMeasure::mass), Catch::Contains("track_mass"));
}

TEST_CASE("TF-IDF, count and KL slot rankings equal a plain reference", "[continual][select]") {
  // 9 slots. Background: 4 batches; slot 0 is read by all of them, slot 1 by one, 2 by two.
  pkm::SlotStatistics bg(9);
  bg.add(crafted_cache(3, {{0, 1}, {0, 2}}));
  bg.add(crafted_cache(3, {{0, 2}}));
  bg.add(crafted_cache(3, {{0, 5}}));
  bg.add(crafted_cache(3, {{0, 0}}));
  // The batch reads slot 0 four times, slot 1 twice, slot 3 once, slot 2 once.
  const auto batch_cache = crafted_cache(3, {{0, 1}, {0, 3}, {0, 1}, {0, 2}});
  const pkm::SlotCounts batch = pkm::count_slots(batch_cache, 9);
  CHECK(batch.slots == std::vector<std::int64_t>{0, 1, 2, 3});
  CHECK(batch.counts == std::vector<std::int64_t>{4, 2, 1, 1});

  // The plain reference of each score.
  const double C = 8, D = 4;
  const std::map<std::int64_t, double> df = {{0, 4}, {1, 1}, {2, 2}, {3, 0}};
  const std::map<std::int64_t, double> cbg = {{0, 6}, {1, 1}, {2, 2}, {3, 0}};
  const double Cbg = 10 + 1.0 * 9;  // 10 background reads, smoothing 1 over 9 slots
  std::map<std::int64_t, double> tfidf, kl;
  for (std::size_t i = 0; i < batch.slots.size(); ++i) {
    const auto s = batch.slots[i];
    const double p = double(batch.counts[i]) / C;
    tfidf[s] = p * std::log((1 + D) / (1 + df.at(s)));
    kl[s] = p * std::log(p / ((cbg.at(s) + 1.0) / Cbg));
  }
  auto ranked = [](const std::map<std::int64_t, double>& score) {
    std::vector<std::int64_t> ids;
    for (auto& kv : score) ids.push_back(kv.first);
    std::stable_sort(ids.begin(), ids.end(),
                     [&](auto a, auto b) { return score.at(a) > score.at(b); });
    return ids;
  };
  pkm::SlotSelectionOptions o;
  o.top = 4;
  for (auto score : {pkm::SlotScore::tf_idf, pkm::SlotScore::kl}) {
    o.score = score;
    const auto& ref = score == pkm::SlotScore::tf_idf ? tfidf : kl;
    const pkm::SlotSelection sel = pkm::select_slots(batch, bg, o);
    CHECK(sel.slots == ranked(ref));
    for (std::size_t i = 0; i < sel.slots.size(); ++i)
      CHECK(sel.scores[i] == Approx(ref.at(sel.slots[i])).epsilon(1e-14));
  }
  // TF-IDF: slot 0, read most but by every background batch, ranks last (idf 0); slot 1
  // (twice here, in one background batch) first, then slot 3 (once here, never before).
  o.score = pkm::SlotScore::tf_idf;
  CHECK(pkm::select_slots(batch, bg, o).slots == std::vector<std::int64_t>{1, 3, 2, 0});
  // Count: 0 (4), 1 (2), then the tie 2, 3 to the lower id.
  o.score = pkm::SlotScore::count;
  CHECK(pkm::select_slots(batch, bg, o).slots == std::vector<std::int64_t>{0, 1, 2, 3});
  // top 2 and fraction 0.5 (2 of 4 slots) keep the same two; the mask allows exactly them.
  o.score = pkm::SlotScore::tf_idf;
  o.top = 2;
  const auto by_top = pkm::select_slots(batch, bg, o);
  o.top = 0;
  o.fraction = 0.5;
  const auto by_fraction = pkm::select_slots(batch, bg, o);
  CHECK(by_top.slots == by_fraction.slots);
  CHECK(by_top.mask.size() == 2);
  CHECK(by_top.mask.table_rows() == 9);
  for (std::int64_t s = 0; s < 9; ++s) {
    CHECK(by_top.mask.allows(s) ==
          (std::find(by_top.slots.begin(), by_top.slots.end(), s) != by_top.slots.end()));
  }
  o.fraction = 0.3;  // 1.2 slots, rounded up to 2
  CHECK(pkm::select_slots(batch, bg, o).slots.size() == 2);
}

TEST_CASE("slot selection and statistics refuse bad input with clear errors",
          "[continual][errors]") {
  pkm::SlotStatistics bg(9);
  bg.add(crafted_cache(3, {{0, 1}}));
  const pkm::SlotCounts batch = pkm::count_slots(crafted_cache(3, {{0, 1}, {2, 1}}), 9);
  pkm::SlotSelectionOptions o;
  o.top = 4;  // the batch read 3 distinct slots
  CHECK_THROWS_WITH(pkm::select_slots(batch, bg, o), Catch::Contains("read only 3 distinct slots"));
  o.top = 0;
  CHECK_THROWS_WITH(pkm::select_slots(batch, bg, o), Catch::Contains("exactly one of top"));
  o.top = 1;
  o.fraction = 0.5;
  CHECK_THROWS_WITH(pkm::select_slots(batch, bg, o), Catch::Contains("exactly one of top"));
  o.top = 0;
  o.fraction = 1.5;
  CHECK_THROWS_WITH(pkm::select_slots(batch, bg, o), Catch::Contains("fraction = 1.5"));
  o.fraction = std::nan("");
  CHECK_THROWS_AS(pkm::select_slots(batch, bg, o), std::invalid_argument);
  o.fraction = 0;
  o.top = 1;
  // An empty batch; a batch of another table; a background with no batch.
  const pkm::SlotCounts empty = pkm::count_slots(crafted_cache(3, {}), 9);
  CHECK_THROWS_WITH(pkm::select_slots(empty, bg, o), Catch::Contains("read no slot"));
  const pkm::SlotCounts other = pkm::count_slots(crafted_cache(4, {{0, 15}}), 16);
  CHECK_THROWS_WITH(pkm::select_slots(other, bg, o), Catch::Contains("table of 16 rows"));
  CHECK_THROWS_WITH(pkm::select_slots(batch, pkm::SlotStatistics(9), o),
                    Catch::Contains("hold no batch"));
  o.score = pkm::SlotScore::count;  // needs no background batch
  CHECK(pkm::select_slots(batch, pkm::SlotStatistics(9), o).slots == std::vector<std::int64_t>{1});
  o.score = pkm::SlotScore::kl;
  o.kl_smoothing = 0;
  CHECK_THROWS_WITH(pkm::select_slots(batch, bg, o), Catch::Contains("kl_smoothing"));

  // Caches from a layer of another size, unfilled, or reading outside the table: refused,
  // the statistics unchanged.
  pkm::SlotStatistics st(9, true);
  st.add(crafted_cache(3, {{0, 1}}));
  const auto counts = st.counts();
  CHECK_THROWS_WITH(st.add(crafted_cache(4, {{0, 1}})), Catch::Contains("layer of 16 slots"));
  auto unfilled = crafted_cache(3, {{0, 1}});
  unfilled.batch = -1;
  CHECK_THROWS_WITH(st.add(unfilled), Catch::Contains("not filled"));
  auto hostile = crafted_cache(3, {{0, 1}, {2, 3}});
  hostile.indices(1, 1) = 9;
  const pkm::ForwardCache<float> good = crafted_cache(3, {{5, 6}});
  CHECK_THROWS_AS(st.add(std::vector<const pkm::ForwardCache<float>*>{&good, &hostile}),
                  std::out_of_range);
  CHECK_THROWS_AS(pkm::count_slots(hostile, 9), std::out_of_range);
  CHECK(st.counts() == counts);
  CHECK(st.documents() == 1);
  CHECK_THROWS_WITH(st.merge(pkm::SlotStatistics(9, false)), Catch::Contains("without mass"));
  CHECK_THROWS_WITH(st.merge(pkm::SlotStatistics(16, true)), Catch::Contains("16 slots"));
  CHECK_THROWS_AS(pkm::SlotStatistics(0), std::invalid_argument);
  pkm::SlotStatistics made_default;
  CHECK_THROWS_WITH(made_default.add(good), Catch::Contains("default-constructed"));

  // Masks: rows outside the table, a mask for another table.
  CHECK_THROWS_AS(pkm::RowMask(9, {3, 9}), std::out_of_range);
  CHECK_THROWS_AS(pkm::RowMask(0, {}), std::invalid_argument);
  pkm::optim::SparseSgd<float> sgd(9, 2);
  CHECK_THROWS_WITH(sgd.set_row_mask(pkm::RowMask(16, {1})), Catch::Contains("table of 16 rows"));
  CHECK(sgd.row_mask() == nullptr);
  pkm::SparseRowGrad<float> g;
  g.dim = 2;
  g.rows = {1, 4};
  g.values = MatF::Ones(2, 2);
  CHECK_THROWS_WITH(pkm::mask_gradient(g, pkm::RowMask(16, {1}), 9),
                    Catch::Contains("table of 16 rows"));
  CHECK(g.rows.size() == 2);
  pkm::mask_gradient(g, pkm::RowMask(9, {4, 7}), 9);
  CHECK(g.rows == std::vector<std::int64_t>{4});
  CHECK(g.values.rows() == 1);
}

TEST_CASE("slot statistics save and load bit for bit, and a hostile file changes nothing",
          "[continual][io]") {
  pkm::SlotStatistics st(9, true);
  st.add(crafted_cache(3, {{0, 1}, {0, 4}}));
  st.add(crafted_cache(3, {{8, 1}}));
  pkm::io::SafetensorsWriter w;
  pkm::io::add_slot_statistics(w, st, "stats.");
  const auto bytes = w.to_bytes();
  const auto f = pkm::io::SafetensorsFile::from_bytes(bytes, "stats.safetensors");
  pkm::SlotStatistics back(9, true);
  pkm::io::load_slot_statistics(f, back, "stats.");
  CHECK(back.counts() == st.counts());
  CHECK(back.document_counts() == st.document_counts());
  CHECK(back.mass() == st.mass());
  CHECK(back.documents() == 2);
  CHECK(back.total_reads() == st.total_reads());
  // Loaded statistics keep counting: documents continue from the file's.
  back.add(crafted_cache(3, {{1, 1}}));
  CHECK(back.document_counts()[1] == 3);
  CHECK(back.counts()[1] == 4);

  // A file whose counters disagree (a slot in more documents than there are): refused.
  pkm::SlotStatistics bad = st;
  auto tamper = [&](pkm::SlotStatistics& s) {
    s.for_each_state(
        [](const std::string& name, const std::vector<std::int64_t>&, auto* data, auto...) {
          if (name == "document_count") data[0] = 7;
        });
  };
  tamper(bad);
  pkm::io::SafetensorsWriter wb;
  pkm::io::add_slot_statistics(wb, bad, "stats.");
  const auto fb = pkm::io::SafetensorsFile::from_bytes(wb.to_bytes(), "bad.safetensors");
  pkm::SlotStatistics target = st;
  CHECK_THROWS_WITH(pkm::io::load_slot_statistics(fb, target, "stats."), Catch::Contains("slot 0"));
  CHECK(target.counts() == st.counts());
  CHECK(target.document_counts() == st.document_counts());
  // Statistics of another size, or without the mass asked for: refused.
  pkm::SlotStatistics other(16, true);
  CHECK_THROWS_WITH(pkm::io::load_slot_statistics(f, other, "stats."), Catch::Contains("shape"));
  pkm::SlotStatistics no_mass(9, false);
  pkm::io::SafetensorsWriter wn;
  pkm::io::add_slot_statistics(wn, no_mass, "stats.");
  const auto fn = pkm::io::SafetensorsFile::from_bytes(wn.to_bytes(), "nomass.safetensors");
  CHECK_THROWS_WITH(pkm::io::load_slot_statistics(fn, target, "stats."), Catch::Contains("mass"));
  CHECK(target.mass() == st.mass());
}

TEST_CASE("hostile weights and counts: refused where they enter, never saved unloadable",
          "[continual][errors]") {
  // NaN or negative softmax weights with mass tracking: refused at add (the mass used to become
  // NaN, the summaries 0, and the saved file unloadable).
  for (float bad :
       {std::numeric_limits<float>::quiet_NaN(), -0.5f, std::numeric_limits<float>::infinity()}) {
    INFO("weight " << bad);
    pkm::SlotStatistics st(9, true);
    st.add(crafted_cache(3, {{0, 1}}));
    const auto before = st.mass();
    auto cache = crafted_cache(3, {{2, 3}, {4, 5}});
    cache.weights(1, 0) = bad;
    CHECK_THROWS_WITH(st.add(cache),
                      Catch::Contains("holds weight") && Catch::Contains("token 1, read 0"));
    CHECK(st.mass() == before);
    CHECK(st.documents() == 1);
    // Without mass the weights are not used: the counts are added.
    pkm::SlotStatistics counts_only(9, false);
    CHECK_NOTHROW(counts_only.add(cache));
  }
  // A batch whose counts overflow int64 (signed overflow, and a TF-IDF score of 1e17 where
  // log(1 + D) is the most): refused with the counters' one message.
  pkm::SlotStatistics bg(9);
  bg.add(crafted_cache(3, {{0, 1}}));
  pkm::SlotCounts batch;
  batch.table_rows = 9;
  batch.slots = {1, 2};
  batch.counts = {std::numeric_limits<std::int64_t>::max(), 5};
  pkm::SlotSelectionOptions o;
  o.top = 1;
  for (auto score : {pkm::SlotScore::tf_idf, pkm::SlotScore::kl, pkm::SlotScore::count}) {
    o.score = score;
    CHECK_THROWS_WITH(pkm::select_slots(batch, bg, o),
                      Catch::Contains("would overflow a 64-bit counter"));
  }
  // merge() and add() give the same message.
  pkm::SlotStatistics big(9);
  big.for_each_state(
      [&](const std::string& name, const std::vector<std::int64_t>&, auto* data, auto...) {
        using T = std::remove_pointer_t<decltype(data)>;
        if constexpr (std::is_same_v<T, std::int64_t>) {
          if (name == "documents") data[0] = 1;
          if (name == "count") data[4] = std::numeric_limits<std::int64_t>::max() - 1;
          if (name == "document_count") data[4] = 1;
        }
      });
  big.check_consistent("test");
  pkm::SlotStatistics one(9);
  one.add(crafted_cache(3, {{0, 1}}));
  CHECK_THROWS_WITH(big.merge(one), Catch::Contains("would overflow a 64-bit counter"));
  CHECK_THROWS_WITH(big.add(crafted_cache(3, {{0, 1}})),
                    Catch::Contains("would overflow a 64-bit counter"));
  CHECK(big.counts()[0] == 0);
}

TEST_CASE("KL scores stay finite and exact for any finite smoothing > 0", "[continual][select]") {
  // 1e308 and 5e-324 passed the check and gave +inf scores, so the ranking fell back to slot
  // ids. Against the same formula in long double (whose range holds every intermediate).
  pkm::SlotStatistics bg(9);
  bg.add(crafted_cache(3, {{0, 1}, {0, 2}, {0, 2}}));
  bg.add(crafted_cache(3, {{5, 5}}));
  const pkm::SlotCounts batch =
      pkm::count_slots(crafted_cache(3, {{0, 1}, {0, 3}, {0, 1}, {8, 2}, {8, 8}}), 9);
  for (double a : {1e308, std::numeric_limits<double>::max(), 1.0, 1e-300, 5e-324}) {
    INFO("kl_smoothing " << a);
    const std::vector<double> got = pkm::score_slots(batch, bg, pkm::SlotScore::kl, a);
    const long double C = batch.total(),
                      Cbg = (long double)bg.total_reads() + (long double)a * 9.0L;
    for (std::size_t i = 0; i < got.size(); ++i) {
      const long double p = batch.counts[i] / C;
      const long double q =
          ((long double)bg.counts()[std::size_t(batch.slots[i])] + (long double)a) / Cbg;
      const long double want = p * std::log(p / q);
      CHECK(std::isfinite(got[i]));
      CHECK(got[i] == Approx(double(want)).epsilon(1e-12).margin(1e-15));
    }
    // The ranking is that of the scores (not slot-id order): with huge smoothing q is uniform
    // and KL ranks like count.
    pkm::SlotSelectionOptions o;
    o.score = pkm::SlotScore::kl;
    o.kl_smoothing = a;
    o.top = 1;
    const auto best = pkm::select_slots(batch, bg, o).slots.front();
    const auto it = std::max_element(got.begin(), got.end());
    CHECK(best == batch.slots[std::size_t(it - got.begin())]);
  }
}
