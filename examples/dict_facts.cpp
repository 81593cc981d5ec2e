// dict_facts: real facts from a real dictionary. Does a Memory+ layer store more of them than a
// dense FFN of the same compute?
//
// The facts are (word -> first translation) pairs of a dictd bilingual dictionary (Debian's
// dict-freedict-* packages; scripts/install-deps.sh --data installs eng-deu), one pair per
// headword (examples/dictd.hpp). The model spells the translation from the word: each token is
// (the word's letters, one slot per position, padded; an output position p) and its target is
// the translation's letter at p, or END after the last one. The model is train_facts's
// (examples/facts_model.hpp): every input slot's symbol embedded in a small table of its own,
// summed, one residual block (a SwiGLU FFN, or a Memory+ layer of the same multiply-adds per
// token), a read-out over the letters. A pair is recalled when every one of its tokens is right
// (exact match of the whole translation). Several dictionary sizes are trained, each from
// scratch; pairs not trained on (held out) show what generalises.
//
//   dict_facts [--dict /usr/share/dictd/freedict-eng-deu] [--sizes 10000,40000]
//              [--heldout 2000] [--epochs 12] [--csv dict_facts.csv] [...]
#include <pkm/pkm.hpp>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "dictd.hpp"
#include "facts_model.hpp"

namespace {

using namespace facts;  // the model and training code, shared with train_facts

struct Options : ModelOptions, TrainOptions {
  // + dim, heads, n_keys, k_dim, knn, clip, seed, threads (vocab/relations/objects unused);
  // + model, epochs, batch, dense_lr, memory_lr, value_lr, value_clip
  std::string dict = "/usr/share/dictd/freedict-eng-deu";
  std::vector<Index> sizes = {10000, 40000};
  Index heldout = 2000;
  Index max_len = 12;
  std::string csv = "dict_facts.csv";
};

[[noreturn]] void usage(const std::string& error) {
  std::FILE* out = error.empty() ? stdout : stderr;
  if (!error.empty()) std::fprintf(out, "error: %s\n", error.c_str());
  std::fprintf(out,
               "usage: dict_facts [--dict PATH] [--sizes N,N,...] [--heldout N] [--max-len N]\n"
               "         %s\n"
               "         [--dim N] [--n-keys N] [--heads N] [--knn N] [--k-dim N] [--clip X]\n"
               "         [--seed N] [--threads N] [--compute f32|bf16] [--score-compute f32|bf16]\n"
               "         [--csv FILE] [--help]\n"
               "Trains a dense and a memory model to spell each word's translation, for each\n"
               "dictionary size, and prints what they recall; --csv FILE (default\n"
               "dict_facts.csv) gets one row per model and size. PATH: a dictd dictionary\n"
               "(NAME, NAME.index or NAME.dict.dz; default the FreeDict English-German one).\n",
               TrainOptions::training_flags());
  std::exit(error.empty() ? 0 : 2);
}

Options parse(int argc, char** argv) {
  Options o;
  o.dim = 128;
  o.n_keys = 256;
  o.epochs = 12;
  parse_flags(argc, argv, usage, {}, [&](const std::string& a, const std::string& v, auto& num) {
    if (a == "--vocab" || a == "--relations" || a == "--objects")
      usage("unknown flag " + a + " (the dictionary sets the vocabulary)");
    if (o.take(a, num) || o.take_word(a, v, usage) || o.take_training(a, v, num, usage)) return true;
    if (a == "--dict") {
      o.dict = v;
    } else if (a == "--sizes") {
      o.sizes = flag_list(a, v, 1, 1e8, "pair counts", usage);
    } else if (a == "--csv") {
      o.csv = v;
    } else if (a == "--heldout") {
      o.heldout = Index(num(0, 1e7));
    } else if (a == "--max-len") {
      o.max_len = Index(num(1, 64));
    } else {
      return false;
    }
    return true;
  });
  return o;
}

/// The letters of every pair, numbered from 2 in code point order (0: padding, 1: END).
struct Alphabet {
  std::map<char32_t, std::int32_t> id;
  explicit Alphabet(const std::vector<dictd::Pair>& pairs) {
    for (const auto& p : pairs) {
      for (char32_t c : p.source) id.emplace(c, 0);
      for (char32_t c : p.target) id.emplace(c, 0);
    }
    std::int32_t next = 2;
    for (auto& [c, i] : id) i = next++;
  }
  Index size() const { return Index(id.size()) + 2; }
};

/// A set of pairs as facts: one per (pair, output position up to its END); group[k] is the
/// first fact of pair k (group.back() = the fact count).
struct PairFacts {
  Facts facts;
  std::vector<Index> group;
};

PairFacts to_facts(const std::vector<dictd::Pair>& pairs, const Alphabet& abc, Index max_len) {
  PairFacts out;
  out.facts.slots = max_len + 1;
  std::vector<std::int32_t> in(std::size_t(max_len + 1));
  for (const auto& p : pairs) {
    out.group.push_back(out.facts.size());
    std::fill(in.begin(), in.end(), 0);
    for (std::size_t k = 0; k < p.source.size(); ++k) in[k] = abc.id.at(p.source[k]);
    for (std::size_t pos = 0; pos <= p.target.size(); ++pos) {
      in[std::size_t(max_len)] = std::int32_t(pos);
      out.facts.add(in.data(), pos < p.target.size() ? abc.id.at(p.target[pos]) : 1);
    }
  }
  out.group.push_back(out.facts.size());
  return out;
}

/// The fraction of pairs whose every token the model gets right (the whole translation).
double exact_recall(Model& m, const PairFacts& pf) {
  const Facts& f = pf.facts;
  std::vector<std::int64_t> ids(std::size_t(f.size()));
  for (Index i = 0; i < f.size(); ++i) ids[std::size_t(i)] = i;
  std::vector<char> hit(std::size_t(f.size()));
  for (Index s = 0; s < f.size(); s += 4096) {
    const Index B = std::min<Index>(4096, f.size() - s);
    m.run(f, ids.data() + s, B, false, {}, hit.data() + s);
  }
  Index recalled = 0;
  for (std::size_t k = 0; k + 1 < pf.group.size(); ++k) {
    recalled += std::all_of(hit.begin() + pf.group[k], hit.begin() + pf.group[k + 1],
                            [](char h) { return h != 0; });
  }
  return double(recalled) / double(std::max<std::size_t>(pf.group.size() - 1, 1));
}

struct Result {
  std::string model;
  Index pairs = 0;
  double train_recall = 0, heldout_recall = 0, seconds = 0, macs = 0;
  Index total_params = 0;
};

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  const Options o = parse(argc, argv);
  if (o.threads > 0) omp_set_num_threads(o.threads);
  try {
    const dictd::Dictionary dict = dictd::open(o.dict);
    std::size_t skipped = 0;
    std::vector<dictd::Pair> pairs = dictd::build_pairs(dict, std::size_t(o.max_len), &skipped);
    std::mt19937_64 shuffle(o.seed);
    for (std::size_t i = pairs.size(); i > 1; --i) std::swap(pairs[i - 1], pairs[shuffle() % i]);
    const Index largest = *std::max_element(o.sizes.begin(), o.sizes.end());
    if (Index(pairs.size()) < largest + o.heldout) {
      throw std::runtime_error(dict.name + " gives " + std::to_string(pairs.size()) +
                               " pairs; --sizes up to " + std::to_string(largest) + " and --heldout " +
                               std::to_string(o.heldout) + " need " +
                               std::to_string(largest + o.heldout));
    }
    const std::vector<dictd::Pair> heldout(pairs.begin(), pairs.begin() + o.heldout);
    const std::vector<dictd::Pair> pool(pairs.begin() + o.heldout,
                                        pairs.begin() + o.heldout + largest);
    std::vector<dictd::Pair> used = heldout;
    used.insert(used.end(), pool.begin(), pool.end());
    const Alphabet abc(used);
    const pkm::MemoryConfig mc = o.memory_config();
    const Index hidden = Index(std::llround(memory_macs_per_token(mc) / (3.0 * double(o.dim))));

    std::printf("pkm %s dict_facts: %s: %zu entries, %zu (word -> first translation) pairs of at "
                "most %lld letters (%zu headwords left out)\n",
                PKM_VERSION_STRING, dict.name.c_str(), dict.index.size(), pairs.size(),
                (long long)o.max_len, skipped);
    std::printf("e.g. %s -> %s; %lld letters; %lld pairs held out\n",
                dictd::utf8(pool[0].source).c_str(), dictd::utf8(pool[0].target).c_str(),
                (long long)abc.size() - 2, (long long)o.heldout);
    std::printf("dense:  SwiGLU FFN, hidden %lld; AdamW lr %g\n", (long long)hidden, o.dense_lr);
    std::printf("memory: Memory+ layer, %lld^2 slots, %lld heads, knn %lld, k_dim %lld; AdamW lr "
                "%g; values lazy Adam lr %g\n",
                (long long)mc.n_keys, (long long)mc.heads, (long long)mc.knn, (long long)mc.k_dim,
                o.memory_lr, o.value_lr);
    std::printf("both: d = %lld, %d epochs of batch %lld, %d OpenMP threads\n", (long long)o.dim,
                o.epochs, (long long)o.batch, omp_get_max_threads());

    std::ofstream csv(o.csv);
    if (!csv) throw std::runtime_error("cannot write --csv file '" + o.csv + "'");
    csv << "model,pairs,train_recall,heldout_recall,seconds,macs_per_token,total_params,"
           "tokens\n";
    const PairFacts held = to_facts(heldout, abc, o.max_len);
    std::vector<Result> results;
    for (Index n : o.sizes) {
      const PairFacts train = to_facts({pool.begin(), pool.begin() + n}, abc, o.max_len);
      for (const std::string kind : {"dense", "memory"}) {
        if (o.model != "both" && o.model != kind) continue;
        std::mt19937_64 rng(o.seed + 7);
        std::unique_ptr<Block> block;
        if (kind == "dense") {
          std::mt19937_64 brng(o.seed + 3);
          block = std::make_unique<DenseFfn>(o.dim, hidden, brng);
        } else {
          auto mb = std::make_unique<MemoryBlock>(mc, o.seed + 5);
          pkm::optim::AdamOptions vo;
          vo.lr = o.value_lr;
          vo.max_grad_norm = o.value_clip;
          mb->set_value_optimizer<pkm::optim::LazyAdam<float>>(vo, true);
          block = std::move(mb);
        }
        std::vector<Index> slot_vocab(std::size_t(o.max_len), abc.size());
        slot_vocab.push_back(o.max_len + 1);  // the output position
        Model m(slot_vocab, abc.size(), o.dim, kind == "dense" ? o.dense_lr : o.memory_lr, o.clip,
                std::move(block), rng);
        std::vector<std::int64_t> order(std::size_t(train.facts.size()));
        for (std::size_t i = 0; i < order.size(); ++i) order[i] = std::int64_t(i);
        std::mt19937_64 epoch_rng(o.seed + 99);
        Result r;
        r.model = kind;
        r.pairs = n;
        const std::string label = kind + " " + std::to_string(n);
        for (int e = 1; e <= o.epochs; ++e) {
          train_epoch(m, train.facts, order, o.batch, epoch_rng, label.c_str(), e, o.epochs,
                      r.seconds);
          if (e == o.epochs) {
            r.train_recall = exact_recall(m, train);
            std::fprintf(stderr, " recalled %5.1f%%", 100.0 * r.train_recall);
          }
          std::fprintf(stderr, "\n");
        }
        r.heldout_recall = exact_recall(m, held);
        r.macs = m.block().macs_per_token();
        r.total_params = m.block().total_params();
        csv << r.model << ',' << r.pairs << ',' << r.train_recall << ',' << r.heldout_recall << ','
            << r.seconds << ',' << r.macs << ',' << r.total_params << ',' << train.facts.size()
            << '\n';
        csv.flush();
        results.push_back(r);
      }
    }
    std::printf("\n| block | pairs | MACs/token | block params | trained pairs recalled | held-out "
                "recalled | train time |\n|---|---:|---:|---:|---:|---:|---:|\n");
    for (const Result& r : results) {
      std::printf("| %s | %lld | %.0f | %lld | %.1f%% (%lld) | %.2f%% | %.1f s |\n",
                  r.model.c_str(), (long long)r.pairs, r.macs, (long long)r.total_params,
                  100.0 * r.train_recall, (long long)std::llround(r.train_recall * double(r.pairs)),
                  100.0 * r.heldout_recall, r.seconds);
    }
    for (std::size_t i = 0; i + 1 < results.size(); ++i) {
      if (results[i].model == "dense" && results[i + 1].model == "memory" &&
          results[i].pairs == results[i + 1].pairs) {
        const double d = results[i].train_recall, m = results[i + 1].train_recall;
        if (d > 0) {
          std::printf("%lld pairs: Memory+ recalls %.2fx the pairs of the dense FFN\n",
                      (long long)results[i].pairs, m / d);
        } else {
          std::printf("%lld pairs: Memory+ recalls %.1f%%, the dense FFN none\n",
                      (long long)results[i].pairs, 100.0 * m);
        }
      }
    }
    std::printf("results: %s\n", o.csv.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dict_facts: %s\n", e.what());
    return 1;
  }
  return 0;
}
