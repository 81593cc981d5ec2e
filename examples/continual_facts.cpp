// continual_facts: learning new facts without forgetting old ones — sparse memory finetuning
// (Lin et al., 2025) in miniature, on train_facts' model and data (facts_model.hpp).
//
// 1. Pretrain a Memory+ model on fact set A; the last epoch's batches are the background
//    statistics (pkm::SlotStatistics, one document per batch).
// 2. From that same model, learn a new fact set B (held out of A's subjects and relations,
//    with random objects: new knowledge) by
//      full    every parameter: AdamW on the dense ones, lazy Adam on the values,
//      values  the value table only, plain SGD (pkm::optim::SparseSgd),
//      sparse  the value table only, SGD on the top t slots of each batch by TF-IDF against
//              the background (pkm::select_slots -> set_row_mask), for several t.
// 3. Report per method how much of B is learned and how much of A is retained: a progress
//    bar, a table, a CSV (one line per method and evaluation) and, with
//    examples/plot_continual.py, a plot.
#include <pkm/pkm.hpp>

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "facts_model.hpp"

namespace {

using namespace facts;  // the model and data code, shared with train_facts

struct Options : ModelOptions {
  // + vocab, relations, objects, dim, heads, n_keys, k_dim, knn, clip, seed, threads
  Index new_facts = 1000;  // B
  Index batch = 512;       // pretraining batch
  Index finetune_batch = 64;
  int epochs = 16;           // pretraining on A
  int finetune_epochs = 20;  // on B
  int eval_every = 5;
  double memory_lr = 1e-3;     // pretraining: AdamW on the dense parameters
  double value_lr = 0.1;       // pretraining: lazy Adam on the values
  double full_lr = 1e-3;       // full finetuning: AdamW on the dense parameters
  double full_value_lr = 0.1;  // full finetuning: lazy Adam on the values
  double sgd_lr =
      1000.0;  // value-only and sparse finetuning: SGD on the values (the loss is a batch mean)
  std::vector<Index> tops = {64, 256, 1024};
  std::string score = "tf_idf";
  std::string csv = "continual_facts.csv";

  Options() { vocab = 60; }  // 36,000 facts: pretraining in about half a minute on 2 cores
};

[[noreturn]] void usage(const std::string& error) {
  std::FILE* out = error.empty() ? stdout : stderr;
  if (!error.empty()) std::fprintf(out, "error: %s\n", error.c_str());
  std::fprintf(
      out,
      "usage: continual_facts %s\n"
      "         [--new-facts N] [--batch N] [--finetune-batch N] [--epochs N] [--finetune-epochs "
      "N]\n"
      "         [--eval-every N] [--memory-lr X] [--value-lr X] [--full-lr X] [--full-value-lr X]\n"
      "         [--sgd-lr X] [--tops T1,T2,...] [--score tf_idf|count|kl] [--csv FILE] [--help]\n"
      "Pretrains a Memory+ model on fact set A, then learns a new fact set B by full, value-only\n"
      "and sparse memory finetuning (top t slots per batch), and prints how much of B each\n"
      "learns and how much of A it keeps. --csv FILE (default continual_facts.csv in the current\n"
      "folder) gets one line per method and evaluation.\n",
      ModelOptions::flags());
  std::exit(error.empty() ? 0 : 2);
}

Options parse(int argc, char** argv) {
  Options o;
  parse_flags(argc, argv, usage, {}, [&](const std::string& a, const std::string& v, auto& num) {
    if (o.take(a, num) || o.take_word(a, v, usage)) return true;
    if (a == "--csv")
      o.csv = v;
    else if (a == "--score") {
      if (v != "tf_idf" && v != "count" && v != "kl")
        usage("--score = '" + v + "', expected tf_idf, count or kl");
      o.score = v;
    } else if (a == "--tops")
      o.tops = flag_list(a, v, 1, HUGE_VAL, "slot counts", usage);
    else if (a == "--vocab")
      o.vocab = Index(num(2));
    else if (a == "--new-facts")
      o.new_facts = Index(num(1));
    else if (a == "--batch")
      o.batch = Index(num(1));
    else if (a == "--finetune-batch")
      o.finetune_batch = Index(num(1));
    else if (a == "--epochs")
      o.epochs = int(num(1));
    else if (a == "--finetune-epochs")
      o.finetune_epochs = int(num(1));
    else if (a == "--eval-every")
      o.eval_every = int(num(1));
    else if (a == "--memory-lr")
      o.memory_lr = num(0);
    else if (a == "--value-lr")
      o.value_lr = num(0);
    else if (a == "--full-lr")
      o.full_lr = num(0);
    else if (a == "--full-value-lr")
      o.full_value_lr = num(0);
    else if (a == "--sgd-lr")
      o.sgd_lr = num(0);
    else
      return false;
    return true;
  });
  if (o.new_facts >= o.vocab * o.vocab * o.relations) {
    usage("--new-facts = " + std::to_string(o.new_facts) + ", expected fewer than the " +
          std::to_string(o.vocab * o.vocab * o.relations) + " facts of the set");
  }
  return o;
}

/// The memory model as pretraining and every method start it (the same seeds).
std::unique_ptr<Model> make_model(const Options& o, double dense_lr) {
  std::mt19937_64 rng(o.seed + 7);
  return std::make_unique<Model>(o, dense_lr,
                                 std::make_unique<MemoryBlock>(o.memory_config(), o.seed + 5), rng);
}

MemoryBlock& memory(Model& m) { return static_cast<MemoryBlock&>(m.block()); }

std::vector<std::int64_t> iota(Index n) {
  std::vector<std::int64_t> v(static_cast<std::size_t>(n));
  for (Index i = 0; i < n; ++i) v[std::size_t(i)] = i;
  return v;
}

/// One epoch of training over f in shuffled batches: before_backward (if set) runs between
/// each step's forward and backward, after_step(step, tokens) after each step.
template <class Hook>
void run_epoch(Model& m, const Facts& f, Index batch, std::mt19937_64& rng,
               const std::function<void()>& before_backward, Hook&& after_step) {
  std::vector<std::int64_t> order = iota(f.size());
  for (std::size_t i = order.size() - 1; i > 0; --i) std::swap(order[i], order[rng() % (i + 1)]);
  for (Index s = 0; s < f.size(); s += batch) {
    const Index B = std::min(batch, f.size() - s);
    after_step(m.run(f, order.data() + s, B, true, before_backward), B);
  }
}

struct Row {
  std::string method;
  Index top = 0;
  double learned = 0, retained = 0, seconds = 0;
  double slots_per_step = 0;  // rows the value update changed, on average
};

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  const Options o = parse(argc, argv);
  if (o.threads > 0) omp_set_num_threads(o.threads);
  try {
    const pkm::MemoryConfig mc = o.memory_config();
    const Facts all = make_facts(o);
    // B: new_facts facts drawn at random; A: the rest.
    std::vector<std::int64_t> ids = iota(all.size());
    std::mt19937_64 split_rng(o.seed + 11);
    for (std::size_t i = ids.size() - 1; i > 0; --i) std::swap(ids[i], ids[split_rng() % (i + 1)]);
    const Facts B = subset(all, std::vector<std::int64_t>(ids.begin(), ids.begin() + o.new_facts));
    const Facts A = subset(all, std::vector<std::int64_t>(ids.begin() + o.new_facts, ids.end()));
    const bool tty = isatty(fileno(stderr));

    std::printf(
        "pkm %s continual_facts: fact set A %lld facts, new fact set B %lld facts (seed %llu), %d "
        "threads\n",
        PKM_VERSION_STRING, (long long)A.size(), (long long)B.size(), (unsigned long long)o.seed,
        omp_get_max_threads());
    std::printf(
        "model: d = %lld, Memory+ %lld^2 = %lld slots, %lld heads x knn %lld = %lld reads per "
        "token, products in %s\n",
        (long long)o.dim, (long long)mc.n_keys, (long long)mc.slots(), (long long)mc.heads,
        (long long)mc.knn, (long long)mc.bag_size(), pkm::dtype_name(mc.compute));
    std::ofstream csv(o.csv);
    if (!csv) throw std::runtime_error("cannot write --csv file '" + o.csv + "'");
    csv << "method,top,epoch,seconds,learned,retained\n";
    std::printf("per-evaluation results -> %s\n\n", o.csv.c_str());

    // ---- 1. pretraining on A, background statistics from its last epoch ----
    auto pre = make_model(o, o.memory_lr);
    {
      pkm::optim::AdamOptions vo;
      vo.lr = o.value_lr;
      vo.max_grad_norm = 1.0;
      memory(*pre).set_value_optimizer<pkm::optim::LazyAdam<float>>(vo, true);
    }
    pkm::SlotStatistics background(mc.slots(), true);
    std::mt19937_64 rng(o.seed + 99);
    const double t0 = now();
    for (int e = 1; e <= o.epochs; ++e) {
      double loss = 0;
      Index seen = 0, correct = 0;
      run_epoch(*pre, A, o.batch, rng, {}, [&](const Step& s, Index n) {
        loss += s.loss_sum;
        correct += s.correct;
        seen += n;
        if (e == o.epochs) background.add(memory(*pre).cache());
        if (tty)
          progress("A", e, o.epochs, double(seen) / double(A.size()), loss / double(seen),
                   double(correct) / double(seen), now() - t0);
      });
      if (!tty)
        progress("A", e, o.epochs, 1.0, loss / double(seen), double(correct) / double(seen),
                 now() - t0);
      std::fprintf(stderr, "\n");
    }
    const double base_A = evaluate(*pre, A, 4096), base_B = evaluate(*pre, B, 4096);
    csv << "pretrained,0,0," << now() - t0 << ',' << base_B << ',' << base_A << '\n';
    std::printf("pretrained on A: recalls %.1f%% of A, %.1f%% of B (chance: %.1f%%), %.0f s\n",
                100 * base_A, 100 * base_B, 100.0 / double(o.objects), now() - t0);
    std::printf(
        "background: %lld batches, %.1f%% of the slots read, usage KL to uniform %.2f nats\n\n",
        (long long)background.documents(), 100 * background.used_fraction(),
        background.kl_to_uniform());

    // ---- 2. learning B, each method from the pretrained model ----
    pkm::SlotSelectionOptions sel;
    sel.score = o.score == "count" ? pkm::SlotScore::count
                : o.score == "kl"  ? pkm::SlotScore::kl
                                   : pkm::SlotScore::tf_idf;
    std::vector<Row> rows;
    auto finetune = [&](const std::string& method, Index top) {
      const bool full = method == "full";
      auto m = make_model(o, o.full_lr);
      m->copy_weights_from(*pre);
      m->set_update_dense(full);
      MemoryBlock& mem = memory(*m);
      pkm::optim::SparseSgd<float>* sgd = nullptr;
      if (full) {
        pkm::optim::AdamOptions vo;
        vo.lr = o.full_value_lr;
        vo.max_grad_norm = 1.0;
        mem.set_value_optimizer<pkm::optim::LazyAdam<float>>(vo, true);
      } else {
        pkm::optim::SgdOptions so;
        so.lr = o.sgd_lr;
        sgd = &mem.set_value_optimizer<pkm::optim::SparseSgd<float>>(so, true);
      }
      const std::string label = top > 0 ? method + " t=" + std::to_string(top) : method;
      Row r{method, top};
      std::mt19937_64 frng(o.seed + 123);
      const double ts = now();
      double changed = 0;
      Index steps = 0;
      for (int e = 1; e <= o.finetune_epochs; ++e) {
        double loss = 0;
        Index seen = 0, correct = 0;
        // Between each step's forward and its backward: the slots the batch read, and (sparse)
        // the mask of its top t, which the fused backward's SGD step then honours.
        const auto pick = [&] {
          const pkm::SlotCounts read = pkm::count_slots(mem.cache(), mc.slots());
          if (top > 0) {
            sel.top = std::min<Index>(top, Index(read.slots.size()));
            const pkm::SlotSelection picked = pkm::select_slots(read, background, sel);
            sgd->set_row_mask(picked.mask);
            changed += double(picked.slots.size());
          } else {
            changed += double(read.slots.size());
          }
        };
        run_epoch(*m, B, o.finetune_batch, frng, pick, [&](const Step& st, Index n) {
          loss += st.loss_sum;
          correct += st.correct;
          seen += n;
          ++steps;
          if (tty)
            progress(label.c_str(), e, o.finetune_epochs, double(seen) / double(B.size()),
                     loss / double(seen), double(correct) / double(seen), now() - ts);
        });
        const bool eval = e % o.eval_every == 0 || e == o.finetune_epochs;
        if (!tty && eval)
          progress(label.c_str(), e, o.finetune_epochs, 1.0, loss / double(seen),
                   double(correct) / double(seen), now() - ts);
        if (eval) {
          r.learned = evaluate(*m, B, 4096);
          r.retained = evaluate(*m, A, 4096);
          csv << method << ',' << top << ',' << e << ',' << now() - ts << ',' << r.learned << ','
              << r.retained << '\n';
          csv.flush();
          std::fprintf(stderr, "  B %5.1f%%  A %5.1f%%", 100 * r.learned, 100 * r.retained);
        }
        if (tty || eval) std::fprintf(stderr, "\n");
      }
      r.seconds = now() - ts;
      r.slots_per_step = changed / double(std::max<Index>(steps, 1));
      rows.push_back(r);
    };
    finetune("full", 0);
    finetune("values", 0);
    for (Index t : o.tops) finetune("sparse", t);

    // ---- 3. the table ----
    std::printf(
        "\n| method | slots updated per step | B learned | A retained | A forgotten (facts) | "
        "forgotten / full's |\n");
    std::printf("|---|---:|---:|---:|---:|---:|\n");
    const double full_forgot = base_A - rows.front().retained;
    std::printf("| pretrained | | %.1f%% | %.2f%% | | |\n", 100 * base_B, 100 * base_A);
    for (const Row& r : rows) {
      const double forgot = base_A - r.retained;
      const std::string label = r.top > 0
                                    ? "sparse, top " + std::to_string(r.top) + " (" + o.score + ")"
                                : r.method == "full" ? "full finetuning"
                                                     : "values only (SGD)";
      std::string per_step =
          r.method == "full" ? "all + dense" : std::to_string(std::llround(r.slots_per_step));
      std::printf("| %s | %s | %.1f%% | %.2f%% | %.2f pp (%lld) | %s |\n", label.c_str(),
                  per_step.c_str(), 100 * r.learned, 100 * r.retained, 100 * forgot,
                  (long long)std::llround(forgot * double(A.size())),
                  full_forgot > 0
                      ? (std::to_string(std::llround(100 * forgot / full_forgot)) + "%").c_str()
                      : "-");
    }
    std::printf("\ncurves: %s (plot: python3 examples/plot_continual.py %s)\n", o.csv.c_str(),
                o.csv.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "continual_facts: %s\n", e.what());
    return 1;
  }
  return 0;
}
