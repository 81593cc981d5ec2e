// pkm/slot_statistics.hpp — how often each slot of a value table is read. A SlotStatistics
// accumulates, from the forward caches of any layers sharing the table, per slot:
//   count           reads (a token reading the slot through one head is one read),
//   document_count  batches that read it at least once (a batch is one add() call: the
//                   "documents" of TF-IDF slot ranking, pkm/slot_selection.hpp),
//   mass            (optional) the sum of the softmax weights of those reads,
// over any number of batches; merge() adds two of them (threads, processes, files), and they
// save and load with a checkpoint (pkm/io/slot_statistics.hpp). The summaries are XLM's
// memory statistics: the fraction of slots used, the usage entropy and its KL divergence to
// uniform, the top slots and a histogram. Counting is serial, in token order, so the result
// is the same bits whatever the thread count; it costs one increment per read (under 1 % of
// the layer's forward, docs/continual.md).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "pkm/detail/checks.hpp"
#include "pkm/layer_cache.hpp"
#include "pkm/optim/state.hpp"
#include "pkm/types.hpp"

namespace pkm {

/// What a summary measures: reads (count) or softmax-weighted reads (mass).
enum class SlotMeasure { count, mass };

namespace detail {

/// a + b for two non-negative 64-bit counters (reads, documents), or std::runtime_error
/// "who: <what> would overflow a 64-bit counter (a + b); nothing was changed": the one check
/// and message of every counter sum (adding a batch, merging, summing over processes,
/// scoring a batch's counts).
inline std::int64_t counter_add(const char* who, const char* what, std::int64_t a, std::int64_t b) {
  if (a < 0 || b < 0 || b > std::numeric_limits<std::int64_t>::max() - a) {
    throw std::runtime_error(std::string(who) + ": " + what + " would overflow a 64-bit counter (" +
                             std::to_string(a) + " + " + std::to_string(b) +
                             "); nothing was changed");
  }
  return a + b;
}

/// Checks that every cache was filled by a completed forward of a layer whose table has
/// `slots` rows, with slot ids inside it (std::invalid_argument / std::out_of_range naming the
/// cache), then calls fn(slot, weight) for every read, cache by cache, in token order.
template <class S, class Fn>
void for_each_read(const char* who, const std::vector<const ForwardCache<S>*>& caches, Index slots,
                   Fn&& fn) {
  for (std::size_t c = 0; c < caches.size(); ++c) {
    const ForwardCache<S>* cache = caches[c];
    const std::string name = "cache " + std::to_string(c);
    if (cache == nullptr) throw std::invalid_argument(std::string(who) + ": " + name + " is null");
    if (cache->batch < 0) {
      throw std::invalid_argument(std::string(who) + ": " + name +
                                  " was not filled by a completed forward()");
    }
    if (cache->config.slots() != slots) {
      throw std::invalid_argument(std::string(who) + ": " + name + " is from a layer of " +
                                  std::to_string(cache->config.slots()) +
                                  " slots, expected one reading this table of " +
                                  std::to_string(slots) + " slots");
    }
    const IndexMatrix& idx = cache->indices;
    if (idx.rows() != cache->batch || cache->weights.rows() != idx.rows() ||
        cache->weights.cols() != idx.cols()) {
      throw std::invalid_argument(
          std::string(who) + ": " + name + " holds indices of " + std::to_string(idx.rows()) +
          " x " + std::to_string(idx.cols()) + " and weights of " +
          std::to_string(cache->weights.rows()) + " x " + std::to_string(cache->weights.cols()) +
          " for a batch of " + std::to_string(cache->batch) + "; expected a forward's cache");
    }
    check_indices((std::string(who) + ": " + name).c_str(), idx, slots);
  }
  for (const ForwardCache<S>* cache : caches) {
    const std::int64_t* idx = cache->indices.data();
    const S* w = cache->weights.data();
    for (Index i = 0; i < cache->indices.size(); ++i) fn(idx[i], w[i]);
  }
}

}  // namespace detail

class SlotStatistics {
 public:
  SlotStatistics() = default;
  /// For a table of `slots` rows (n_keys^2); with track_mass, the softmax mass too.
  explicit SlotStatistics(Index slots, bool track_mass = false)
      : slots_(slots), track_mass_(track_mass) {
    if (slots < 1) {
      throw std::invalid_argument("pkm::SlotStatistics: slots = " + std::to_string(slots) +
                                  ", expected >= 1");
    }
    const auto n = static_cast<std::size_t>(slots);
    count_.assign(n, 0);
    document_count_.assign(n, 0);
    last_document_.assign(n, -1);
    if (track_mass) mass_.assign(n, 0.0);
  }

  Index slots() const { return slots_; }
  bool tracks_mass() const { return track_mass_; }
  /// Batches added (add() calls, plus those of merged statistics).
  std::int64_t documents() const { return documents_; }
  /// Reads over all slots.
  std::int64_t total_reads() const { return total_; }
  const std::vector<std::int64_t>& counts() const { return count_; }
  const std::vector<std::int64_t>& document_counts() const { return document_count_; }
  /// Softmax mass per slot (empty unless tracks_mass()).
  const std::vector<double>& mass() const { return mass_; }

  /// Adds one batch: the reads of the forward that filled `cache`.
  template <class S>
  void add(const ForwardCache<S>& cache) {
    add(std::vector<const ForwardCache<S>*>{&cache});
  }
  /// Adds one batch read through several layers sharing this table (one cache per layer):
  /// a slot read by any of them counts once in its document_count. Every cache is checked
  /// first (filled, from a layer of this many slots, slot ids in range); on error nothing
  /// changes.
  /// With mass tracking, every weight must be finite and >= 0 (what a forward writes):
  /// std::invalid_argument otherwise, so that nothing unloadable is ever counted.
  template <class S>
  void add(const std::vector<const ForwardCache<S>*>& caches) {
    const char* who = "pkm::SlotStatistics::add";
    check_made(who);
    Index reads = 0;
    for (const auto* c : caches)
      reads =
          detail::counter_add(who, "the read count", reads, c != nullptr ? c->indices.size() : 0);
    const std::int64_t total = detail::counter_add(who, "the read count", total_, reads);
    const std::int64_t documents = detail::counter_add(who, "the document count", documents_, 1);
    if (track_mass_) check_weights(who, caches);
    // Validate everything before the first increment: for_each_read throws before calling fn.
    const std::int64_t doc = documents_;
    detail::for_each_read<S>(who, caches, slots_, [&](std::int64_t s, S w) {
      const auto u = static_cast<std::size_t>(s);
      ++count_[u];
      if (last_document_[u] != doc) {
        last_document_[u] = doc;
        ++document_count_[u];
      }
      if (track_mass_) mass_[u] += static_cast<double>(w);
    });
    total_ = total;
    documents_ = documents;
  }

  /// Adds `other` (statistics of the same table, from another thread, process or file).
  /// Throws std::invalid_argument for another slot count or mass setting, and
  /// std::runtime_error if a counter would overflow; on error nothing changes.
  void merge(const SlotStatistics& other) {
    const char* who = "pkm::SlotStatistics::merge";
    check_made(who);
    if (other.slots_ != slots_ || other.track_mass_ != track_mass_) {
      throw std::invalid_argument(std::string(who) + ": other has " + std::to_string(other.slots_) +
                                  " slots" + (other.track_mass_ ? " with" : " without") +
                                  " mass, expected " + std::to_string(slots_) +
                                  (track_mass_ ? " with" : " without") + " mass");
    }
    const std::int64_t total = detail::counter_add(who, "the read count", total_, other.total_);
    const std::int64_t documents =
        detail::counter_add(who, "the document count", documents_, other.documents_);
    for (std::size_t u = 0; u < count_.size(); ++u) {
      count_[u] += other.count_[u];
      document_count_[u] += other.document_count_[u];
      if (track_mass_) mass_[u] += other.mass_[u];
    }
    total_ = total;
    documents_ = documents;
  }

  /// Back to no batches (the slot count and mass setting stay).
  void reset() { *this = SlotStatistics(slots_, track_mass_); }

  // ---- summaries ------------------------------------------------------------------------

  /// Fraction of the table's slots read at least once.
  double used_fraction() const {
    Index used = 0;
    for (std::int64_t c : count_) used += c > 0;
    return slots_ > 0 ? double(used) / double(slots_) : 0.0;
  }
  /// Entropy (nats) of the distribution of reads (or of mass) over the slots; 0 with none.
  double entropy(SlotMeasure measure = SlotMeasure::count) const {
    const double total = measure_total(measure);
    if (!(total > 0.0)) return 0.0;
    double h = 0.0;
    for (std::size_t u = 0; u < count_.size(); ++u) {
      const double p = measure_at(measure, u) / total;
      if (p > 0.0) h -= p * std::log(p);
    }
    return h;
  }
  /// KL divergence (nats) from that distribution to the uniform one: log(slots) - entropy.
  /// 0 when every slot is read equally, log(slots) when one slot takes every read.
  double kl_to_uniform(SlotMeasure measure = SlotMeasure::count) const {
    if (!(measure_total(measure) > 0.0)) return 0.0;
    return std::max(0.0, std::log(double(slots_)) - entropy(measure));
  }
  /// The k most read slots (or those of most mass) as (slot, value), best first; ties go to
  /// the lower slot id. k is clamped to the slot count.
  std::vector<std::pair<std::int64_t, double>> top(Index k,
                                                   SlotMeasure measure = SlotMeasure::count) const {
    if (k < 0)
      throw std::invalid_argument("pkm::SlotStatistics::top: k = " + std::to_string(k) +
                                  ", expected >= 0");
    check_measure("pkm::SlotStatistics::top", measure);
    std::vector<std::int64_t> ids(count_.size());
    for (std::size_t u = 0; u < ids.size(); ++u) ids[u] = static_cast<std::int64_t>(u);
    const auto n = static_cast<std::size_t>(std::min<Index>(k, slots_));
    auto better = [&](std::int64_t a, std::int64_t b) {
      const double va = measure_at(measure, std::size_t(a)),
                   vb = measure_at(measure, std::size_t(b));
      return va != vb ? va > vb : a < b;
    };
    std::partial_sort(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(n), ids.end(), better);
    std::vector<std::pair<std::int64_t, double>> out;
    for (std::size_t i = 0; i < n; ++i)
      out.emplace_back(ids[i], measure_at(measure, std::size_t(ids[i])));
    return out;
  }
  /// Slots by read count in powers of two: h[0] slots never read, h[b] (b >= 1) slots read
  /// 2^(b-1) .. 2^b - 1 times. Its length is one past the largest non-empty bucket.
  std::vector<std::int64_t> histogram() const {
    std::vector<std::int64_t> h(1, 0);
    for (std::int64_t c : count_) {
      std::size_t b = 0;
      while (b < 63 && (std::int64_t{1} << b) <= c) ++b;
      if (h.size() <= b) h.resize(b + 1, 0);
      ++h[b];
    }
    return h;
  }

  /// State for saving and loading (pkm/io/slot_statistics.hpp): "documents" (int64 [1]),
  /// "count" and "document_count" (int64 [slots]) and, with mass, "mass" (double [slots]).
  template <class F>
  void for_each_state(F&& fn) {
    fn(std::string("documents"), std::vector<std::int64_t>{1}, &documents_,
       optim::StateKind::step_count);
    fn(std::string("count"), std::vector<std::int64_t>{slots_}, count_.data(),
       optim::StateKind::step_count);
    fn(std::string("document_count"), std::vector<std::int64_t>{slots_}, document_count_.data(),
       optim::StateKind::step_count);
    if (track_mass_)
      fn(std::string("mass"), std::vector<std::int64_t>{slots_}, mass_.data(),
         optim::StateKind::non_negative);
  }

  /// Throws std::invalid_argument unless the counters agree with each other (what loading
  /// checks): every document_count <= documents and <= count, mass 0 where count is 0, and
  /// the counts' sum representable. Recomputes the total and forgets the open document.
  void check_consistent(const char* who) {
    std::int64_t total = 0;
    for (std::size_t u = 0; u < count_.size(); ++u) {
      const std::string at = " of slot " + std::to_string(u);
      if (count_[u] < 0 || document_count_[u] < 0 || document_count_[u] > documents_ ||
          document_count_[u] > count_[u]) {
        throw std::invalid_argument(
            std::string(who) + ": count " + std::to_string(count_[u]) + " and document_count " +
            std::to_string(document_count_[u]) + at + " with " + std::to_string(documents_) +
            " documents; expected 0 <= document_count <= min(count, documents)");
      }
      if (track_mass_ && count_[u] == 0 && mass_[u] != 0.0) {
        throw std::invalid_argument(std::string(who) + ": mass " + std::to_string(mass_[u]) + at +
                                    " that was never read; expected 0");
      }
      if (count_[u] > std::numeric_limits<std::int64_t>::max() - total) {
        throw std::invalid_argument(
            std::string(who) + ": the read count would overflow a 64-bit counter at slot " +
            std::to_string(u) + "; expected counts whose sum is representable");
      }
      total += count_[u];
    }
    total_ = total;
    last_document_.assign(count_.size(), -1);
  }

 private:
  template <class S>
  static void check_weights(const char* who, const std::vector<const ForwardCache<S>*>& caches) {
    for (std::size_t c = 0; c < caches.size(); ++c) {
      if (caches[c] == nullptr) continue;  // for_each_read names it
      const auto& w = caches[c]->weights;
      for (Index i = 0; i < w.size(); ++i) {
        const double v = static_cast<double>(w.data()[i]);
        if (!(std::isfinite(v) && v >= 0.0)) {
          throw std::invalid_argument(
              std::string(who) + ": cache " + std::to_string(c) + " holds weight " +
              std::to_string(v) + " (token " + std::to_string(i / std::max<Index>(1, w.cols())) +
              ", read " + std::to_string(i % std::max<Index>(1, w.cols())) +
              "); expected a forward's softmax weights (finite, >= 0) for the mass");
        }
      }
    }
  }
  void check_made(const char* who) const {
    if (slots_ < 1)
      throw std::invalid_argument(
          std::string(who) +
          ": the statistics were default-constructed; expected SlotStatistics(slots)");
  }
  void check_measure(const char* who, SlotMeasure m) const {
    if (m == SlotMeasure::mass && !track_mass_) {
      throw std::invalid_argument(std::string(who) +
                                  ": mass asked of statistics made without track_mass");
    }
  }
  double measure_total(SlotMeasure m) const {
    check_measure("pkm::SlotStatistics", m);
    if (m == SlotMeasure::count) return double(total_);
    double t = 0.0;
    for (double v : mass_) t += v;
    return t;
  }
  double measure_at(SlotMeasure m, std::size_t u) const {
    return m == SlotMeasure::count ? double(count_[u]) : mass_[u];
  }

  Index slots_ = 0;
  bool track_mass_ = false;
  std::int64_t documents_ = 0, total_ = 0;
  std::vector<std::int64_t> count_, document_count_;
  std::vector<std::int64_t> last_document_;  // the document that last counted each slot
  std::vector<double> mass_;
};

}  // namespace pkm
