// train_facts: does a Memory+ layer store more facts than a dense FFN of the same compute?
//
// A synthetic fact set, made from a seed: subjects are named by two words (a, b) from two
// 100-word vocabularies, each subject has one object for each of R relations, objects are
// drawn uniformly from O. So 100 x 100 x 10 = 100,000 facts (a, b, r) -> o by default.
// The model embeds the three words in small tables (210 rows: too small to store a fact per
// subject), x = E_a[a] + E_b[b] + E_r[r], applies one residual block h = x + f(x) and reads
// out logits = W_o h + b_o over the O objects. f is either
//   dense:  a SwiGLU FFN, W2 (silu(W1 x) * (W3 x)), hidden width chosen so that its
//           multiply-adds per token match the memory layer's, or
//   memory: a pkm Memory+ layer (product keys over n_keys^2 slots, knn per head).
// Both are trained with AdamW on the dense parameters; the memory layer's value table with
// lazy Adam (or row-wise Adagrad) at its own learning rate and clipping, fused with the
// backward. At the end: facts recalled (train accuracy over all facts), time, and a CSV of
// the curves (plot it with examples/plot_training.py).
#include <pkm/pkm.hpp>

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "facts_model.hpp"

namespace {

using namespace facts;  // the model and data code, shared with continual_facts

// ---- options -------------------------------------------------------------------------------

struct Options : ModelOptions, TrainOptions {
  // + vocab, relations, objects, dim, heads, n_keys, k_dim, knn, clip, seed, threads;
  // + model, epochs, batch, dense_lr, memory_lr, value_lr, value_clip
  int eval_every = 5;
  std::string value_optimizer = "adam";  // adam | adagrad
  bool fused = true;
  std::string csv = "train_facts.csv";
};

[[noreturn]] void usage(const std::string& error) {
  std::FILE* out = error.empty() ? stdout : stderr;
  if (!error.empty()) std::fprintf(out, "error: %s\n", error.c_str());
  std::fprintf(out,
               "usage: train_facts %s\n"
               "         %s\n"
               "         [--value-optimizer adam|adagrad] [--no-fused] [--eval-every N] [--csv "
               "FILE] [--help]\n"
               "Trains a model to recall facts and prints its progress; --csv FILE (default\n"
               "train_facts.csv in the current folder) gets one line per model and epoch.\n",
               TrainOptions::training_flags(), ModelOptions::flags());
  std::exit(error.empty() ? 0 : 2);
}

Options parse(int argc, char** argv) {
  Options o;
  parse_flags(argc, argv, usage, {"--no-fused"}, [&](const std::string& a, const std::string& v, auto& num) {
    if (o.take(a, num) || o.take_word(a, v, usage) || o.take_training(a, v, num, usage)) return true;
    if (a == "--no-fused") {
      o.fused = false;
    } else if (a == "--value-optimizer") {
      if (v != "adam" && v != "adagrad")
        usage("--value-optimizer = '" + v + "', expected adam or adagrad");
      o.value_optimizer = v;
    } else if (a == "--csv") {
      o.csv = v;
    } else if (a == "--eval-every") {
      o.eval_every = int(num(1));
    } else {
      return false;
    }
    return true;
  });
  return o;
}

// ---- training loop, progress, results -------------------------------------------------------

struct Result {
  std::string label;
  double accuracy = 0, seconds = 0;
  double macs = 0;
  Index active = 0, total = 0;
  Index table_bytes = 0;  ///< memory: the bytes of the value table the forward reads
};

Result train(const std::string& label, Model& m, const Facts& f, const Options& o,
             std::ofstream& csv) {
  Result r;
  r.label = label;
  std::mt19937_64 rng(o.seed + 99);
  std::vector<std::int64_t> order(std::size_t(f.size()));
  for (Index i = 0; i < f.size(); ++i) order[std::size_t(i)] = i;
  double train_time = 0;
  for (int e = 1; e <= o.epochs; ++e) {
    const Step st = train_epoch(m, f, order, o.batch, rng, label.c_str(), e, o.epochs, train_time);
    const double loss = st.loss_sum;
    const Index correct = st.correct, seen = f.size();
    double eval = -1;
    if (e % o.eval_every == 0 || e == o.epochs) eval = evaluate(m, f, 4096);
    if (eval >= 0) std::fprintf(stderr, " recalled %5.1f%%", 100.0 * eval);
    std::fprintf(stderr, "\n");
    csv << label << ',' << e << ',' << train_time << ',' << loss / double(seen) << ','
        << double(correct) / double(seen) << ',';
    if (eval >= 0) csv << eval;
    csv << '\n';
    csv.flush();
    if (eval >= 0) r.accuracy = eval;
  }
  r.seconds = train_time;
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // the header lines before the progress bars
  const Options o = parse(argc, argv);
  if (o.threads > 0) omp_set_num_threads(o.threads);
  try {
    const Facts facts = make_facts(o);
    const pkm::MemoryConfig mc = o.memory_config();
    // The dense FFN's hidden width: the same multiply-adds per token as the memory layer.
    const Index hidden = Index(std::llround(memory_macs_per_token(mc) / (3.0 * double(o.dim))));

    std::printf(
        "pkm %s train_facts: %lld facts = %lld x %lld subjects x %lld relations -> %lld objects "
        "(seed %llu)\n",
        PKM_VERSION_STRING, (long long)facts.size(), (long long)o.vocab, (long long)o.vocab,
        (long long)o.relations, (long long)o.objects, (unsigned long long)o.seed);
    std::printf("model: d = %lld, one residual block, %d epochs of batch %lld, %d OpenMP threads\n",
                (long long)o.dim, o.epochs, (long long)o.batch, omp_get_max_threads());

    std::ofstream csv(o.csv);
    if (!csv) throw std::runtime_error("cannot write --csv file '" + o.csv + "'");
    std::printf("per-epoch results -> %s\n", o.csv.c_str());
    csv << "model,epoch,seconds,train_loss,train_accuracy,recalled\n";

    std::vector<Result> results;
    auto run_model = [&](const std::string& label, double lr, std::unique_ptr<Block> block) {
      std::mt19937_64 rng(o.seed + 7);
      Model m(o, lr, std::move(block), rng);
      Result r = train(label, m, facts, o, csv);
      r.macs = m.block().macs_per_token();
      r.active = m.block().active_params();
      r.total = m.block().total_params();
      results.push_back(r);
      // The trained memory served from a quantized table (train in fp32, quantize, serve).
      if (auto* mb = dynamic_cast<MemoryBlock*>(&m.block())) {
        results.back().table_bytes = mb->serve_quantized(std::nullopt);
        for (pkm::Dtype f : pkm::kQuantizedDtypes) {
          Result q = r;
          q.table_bytes = mb->serve_quantized(f);
          q.label = label + ", " + pkm::dtype_name(f) + " table";
          q.accuracy = evaluate(m, facts, 4096);
          q.seconds = 0;
          std::fprintf(stderr, "%-7s served from its table quantized to %s: recalled %5.1f%%\n",
                       label.c_str(), pkm::dtype_name(f), 100.0 * q.accuracy);
          results.push_back(q);
        }
        mb->serve_quantized(std::nullopt);
      }
    };
    if (o.model != "memory") {
      std::mt19937_64 rng(o.seed + 3);
      std::printf("dense:  SwiGLU FFN, hidden %lld; AdamW lr %g, clip %g\n", (long long)hidden,
                  o.dense_lr, o.clip);
      run_model("dense", o.dense_lr, std::make_unique<DenseFfn>(o.dim, hidden, rng));
    }
    if (o.model != "dense") {
      std::printf(
          "memory: Memory+ layer, %lld^2 = %lld slots, %lld heads, knn %lld, k_dim %lld; AdamW lr "
          "%g, clip %g; products in %s, key scores in %s;\n"
          "        values: %s, lr %g, clip %g, %s\n",
          (long long)mc.n_keys, (long long)mc.slots(), (long long)mc.heads, (long long)mc.knn,
          (long long)mc.k_dim, o.memory_lr, o.clip, pkm::dtype_name(mc.compute),
          pkm::dtype_name(mc.score_compute),
          o.value_optimizer == "adam" ? "lazy Adam" : "row-wise Adagrad", o.value_lr, o.value_clip,
          o.fused ? "fused with the backward" : "backward then step");
      auto block = std::make_unique<MemoryBlock>(mc, o.seed + 5);
      if (o.value_optimizer == "adam") {
        pkm::optim::AdamOptions vo;
        vo.lr = o.value_lr;
        vo.max_grad_norm = o.value_clip;
        block->set_value_optimizer<pkm::optim::LazyAdam<float>>(vo, o.fused);
      } else {
        pkm::optim::RowWiseAdagradOptions vo;
        vo.lr = o.value_lr;
        vo.max_grad_norm = o.value_clip;
        block->set_value_optimizer<pkm::optim::RowWiseAdagrad<float>>(vo, o.fused);
      }
      run_model("memory", o.memory_lr, std::move(block));
    }

    std::printf(
        "\n| block | MACs/token | active params | total params | facts recalled | train time | "
        "value table |\n");
    std::printf("|---|---:|---:|---:|---:|---:|---:|\n");
    for (const Result& r : results) {
      char table[32] = "-";
      if (r.table_bytes > 0)
        std::snprintf(table, sizeof table, "%.2f MiB", double(r.table_bytes) / double(1 << 20));
      char train_time[32] = "(served)";
      if (r.seconds > 0) std::snprintf(train_time, sizeof train_time, "%.1f s", r.seconds);
      std::printf("| %s | %.0f | %lld | %lld | %.1f%% (%lld) | %s | %s |\n", r.label.c_str(),
                  r.macs, (long long)r.active, (long long)r.total, 100.0 * r.accuracy,
                  (long long)std::llround(r.accuracy * double(facts.size())), train_time, table);
    }
    if (o.model == "both" && results.size() >= 2 && results[0].accuracy > 0) {
      std::printf("\nMemory+ recalls %.2fx the facts of the dense FFN at matched compute.\n",
                  results[1].accuracy / results[0].accuracy);
    }
    std::printf("curves: %s (plot: python3 examples/plot_training.py %s)\n", o.csv.c_str(),
                o.csv.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_facts: %s\n", e.what());
    return 1;
  }
  return 0;
}
