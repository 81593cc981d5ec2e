// pkm/slot_selection.hpp — which slots a batch may update: sparse memory finetuning (Lin et
// al., "Continual Learning via Sparse Memory Finetuning", 2025). The slots a batch reads are
// ranked against how much background (pretraining) data reads them, and only the top t are
// updated; the RowMask this makes is honoured by the sparse optimizers (set_row_mask), and so
// by a layer's backward_fused, and by mask_gradient. Scores of a slot i the batch reads c(i)
// times, out of C reads in all:
//   tf_idf  c(i)/C * log((1 + D) / (1 + df(i)))   D background batches, df(i) of them read i
//   count   c(i)
//   kl      p log(p / q), p = c(i)/C, q = (c_bg(i) + a) / (C_bg + a slots)   (Goyal et al.
//           2026: the slot's term of KL(batch || background), background smoothed by a)
// Ties go to the lower slot id, so the selection is deterministic.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "pkm/layer_cache.hpp"
#include "pkm/row_mask.hpp"
#include "pkm/slot_statistics.hpp"
#include "pkm/types.hpp"

namespace pkm {

/// The slots one batch read and how often: sorted unique slot ids with their read counts.
struct SlotCounts {
  Index table_rows = 0;
  std::vector<std::int64_t> slots;
  std::vector<std::int64_t> counts;
  /// The sum of the counts; std::runtime_error where it would overflow a 64-bit counter.
  std::int64_t total() const {
    std::int64_t t = 0;
    for (std::int64_t c : counts)
      t = detail::counter_add("pkm::SlotCounts::total", "the batch's read count", t, c);
    return t;
  }
};

/// The reads of one batch through the layers (caches) sharing a table of `table_rows` rows.
/// Checks the caches as SlotStatistics::add does.
template <class S>
SlotCounts count_slots(const std::vector<const ForwardCache<S>*>& caches, Index table_rows) {
  const char* who = "pkm::count_slots";
  if (table_rows < 1)
    throw std::invalid_argument(std::string(who) + ": table_rows = " + std::to_string(table_rows) +
                                ", expected >= 1");
  std::vector<std::int64_t> ids;
  detail::for_each_read<S>(who, caches, table_rows, [&](std::int64_t s, S) { ids.push_back(s); });
  std::sort(ids.begin(), ids.end());
  SlotCounts out;
  out.table_rows = table_rows;
  for (std::size_t i = 0; i < ids.size();) {
    std::size_t j = i;
    while (j < ids.size() && ids[j] == ids[i]) ++j;
    out.slots.push_back(ids[i]);
    out.counts.push_back(static_cast<std::int64_t>(j - i));
    i = j;
  }
  return out;
}
template <class S>
SlotCounts count_slots(const ForwardCache<S>& cache, Index table_rows) {
  return count_slots<S>(std::vector<const ForwardCache<S>*>{&cache}, table_rows);
}

enum class SlotScore { tf_idf, count, kl };

inline const char* slot_score_name(SlotScore s) {
  switch (s) {
    case SlotScore::tf_idf:
      return "tf_idf";
    case SlotScore::count:
      return "count";
    case SlotScore::kl:
      return "kl";
  }
  return "?";
}

struct SlotSelectionOptions {
  SlotScore score = SlotScore::tf_idf;
  Index top = 0;          ///< keep this many slots (> 0), or
  double fraction = 0.0;  ///< this fraction of the batch's slots, rounded up (0 < fraction <= 1)
  double kl_smoothing =
      1.0;  ///< a of the kl score (finite, > 0; scores stay finite for any such a)
};

/// The kept slots, best first, with their scores, and the mask allowing them.
struct SlotSelection {
  std::vector<std::int64_t> slots;
  std::vector<double> scores;
  RowMask mask;
};

/// Each slot of `batch` with its score against `background` (same order as batch.slots).
/// Throws std::invalid_argument for a batch and background of different tables, an empty
/// batch, counts that are not positive, or background statistics with no batch (tf_idf, kl).
inline std::vector<double> score_slots(const SlotCounts& batch, const SlotStatistics& background,
                                       SlotScore score, double kl_smoothing = 1.0) {
  const char* who = "pkm::score_slots";
  if (batch.table_rows != background.slots()) {
    throw std::invalid_argument(std::string(who) + ": the batch's counts are for a table of " +
                                std::to_string(batch.table_rows) +
                                " rows, the background statistics for one of " +
                                std::to_string(background.slots()) + "; expected the same table");
  }
  if (batch.slots.empty())
    throw std::invalid_argument(std::string(who) +
                                ": the batch read no slot; expected a batch of at least one token");
  if (batch.counts.size() != batch.slots.size()) {
    throw std::invalid_argument(
        std::string(who) + ": the batch has " + std::to_string(batch.slots.size()) + " slots and " +
        std::to_string(batch.counts.size()) + " counts; expected one count per slot");
  }
  for (std::size_t i = 0; i < batch.slots.size(); ++i) {
    if (batch.slots[i] < 0 || batch.slots[i] >= batch.table_rows ||
        (i > 0 && batch.slots[i] <= batch.slots[i - 1]) || batch.counts[i] < 1) {
      throw std::invalid_argument(
          std::string(who) + ": the batch's slot " + std::to_string(batch.slots[i]) +
          " with count " + std::to_string(batch.counts[i]) + " at position " + std::to_string(i) +
          "; expected sorted unique slots of the table with counts >= 1 (count_slots)");
    }
  }
  if (score != SlotScore::count && background.documents() == 0) {
    throw std::invalid_argument(std::string(who) +
                                ": the background statistics hold no batch; expected statistics "
                                "collected on background data for the " +
                                slot_score_name(score) + " score");
  }
  if (score == SlotScore::kl && !(std::isfinite(kl_smoothing) && kl_smoothing > 0.0)) {
    throw std::invalid_argument(std::string(who) + ": kl_smoothing = " +
                                std::to_string(kl_smoothing) + ", expected a finite value > 0");
  }
  const double C = double(batch.total());
  const double D = double(background.documents());
  // log(C_bg + a slots), formed without overflow for any finite a > 0: a slots may exceed the
  // largest double (a = 1e308), and log q must stay finite for the smallest a (5e-324).
  const double a = kl_smoothing, S = double(background.slots()),
               Cbg = double(background.total_reads());
  const double log_norm = a >= 1.0 ? std::log(a) + std::log(S + Cbg / a) : std::log(Cbg + a * S);
  std::vector<double> out(batch.slots.size());
  for (std::size_t i = 0; i < out.size(); ++i) {
    const auto u = static_cast<std::size_t>(batch.slots[i]);
    const double c = double(batch.counts[i]);
    switch (score) {
      case SlotScore::count:
        out[i] = c;
        break;
      case SlotScore::tf_idf:
        out[i] = c / C * std::log((1.0 + D) / (1.0 + double(background.document_counts()[u])));
        break;
      case SlotScore::kl: {
        const double p = c / C, log_q = std::log(double(background.counts()[u]) + a) - log_norm;
        out[i] = p * (std::log(p) - log_q);
        break;
      }
    }
  }
  return out;
}

/// The top t slots of `batch` by `options.score` against `background`, and their mask.
/// Throws std::invalid_argument (before anything else) for options that ask for neither or
/// both of top and fraction, a fraction outside (0, 1], or top larger than the number of
/// slots the batch read; and what score_slots throws.
inline SlotSelection select_slots(const SlotCounts& batch, const SlotStatistics& background,
                                  const SlotSelectionOptions& options) {
  const char* who = "pkm::select_slots";
  if ((options.top > 0) == (options.fraction > 0.0) || options.top < 0 || options.fraction < 0.0) {
    throw std::invalid_argument(std::string(who) + ": top = " + std::to_string(options.top) +
                                " and fraction = " + std::to_string(options.fraction) +
                                "; expected exactly one of top > 0 or 0 < fraction <= 1");
  }
  if (options.fraction > 0.0 && !(options.fraction <= 1.0)) {
    throw std::invalid_argument(std::string(who) + ": fraction = " +
                                std::to_string(options.fraction) + ", expected 0 < fraction <= 1");
  }
  const std::vector<double> scores =
      score_slots(batch, background, options.score, options.kl_smoothing);
  const Index distinct = static_cast<Index>(batch.slots.size());
  const Index t =
      options.top > 0
          ? options.top
          : std::max<Index>(1, static_cast<Index>(std::ceil(options.fraction * double(distinct))));
  if (t > distinct) {
    throw std::invalid_argument(std::string(who) + ": top = " + std::to_string(t) +
                                " but the batch read only " + std::to_string(distinct) +
                                " distinct slots; expected top <= " + std::to_string(distinct) +
                                " (or a fraction)");
  }
  std::vector<std::size_t> order(scores.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(t), order.end(),
                    [&](std::size_t a, std::size_t b) {
                      return scores[a] != scores[b] ? scores[a] > scores[b] : a < b;
                    });
  SlotSelection out;
  for (Index i = 0; i < t; ++i) {
    out.slots.push_back(batch.slots[order[static_cast<std::size_t>(i)]]);
    out.scores.push_back(scores[order[static_cast<std::size_t>(i)]]);
  }
  out.mask = RowMask(batch.table_rows, out.slots);
  return out;
}

}  // namespace pkm
