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

namespace {

using Mat = pkm::RowMatrix<float>;
using pkm::Index;

// ---- options -------------------------------------------------------------------------------

struct Options {
  Index vocab = 100;       // words per subject vocabulary (subjects = vocab^2)
  Index relations = 10;
  Index objects = 1000;
  Index dim = 128;
  Index heads = 4;
  Index n_keys = 256;
  Index k_dim = 64;
  Index knn = 16;
  Index batch = 512;
  int epochs = 20;
  int eval_every = 5;
  double dense_lr = 3e-3;   // AdamW, every parameter of the dense model
  double memory_lr = 1e-3;  // AdamW, the memory model's dense parameters (query, keys, W1, W2, ...)
  double value_lr = 0.1;    // the value table's own rate (lazy Adam or row-wise Adagrad)
  double clip = 1.0;       // dense gradient norm clip
  double value_clip = 1.0; // value gradient norm clip (its own)
  std::string value_optimizer = "adam";  // adam | adagrad
  bool fused = true;
  std::string model = "both";            // dense | memory | both
  std::string csv = "train_facts.csv";
  std::uint64_t seed = 1;
  int threads = 0;
};

[[noreturn]] void usage(const std::string& error) {
  std::FILE* out = error.empty() ? stdout : stderr;
  if (!error.empty()) std::fprintf(out, "error: %s\n", error.c_str());
  std::fprintf(out,
               "usage: train_facts [--model dense|memory|both] [--epochs N] [--batch N] [--dim N]\n"
               "         [--vocab N] [--relations N] [--objects N] [--n-keys N] [--heads N] [--knn N]\n"
               "         [--k-dim N] [--dense-lr X] [--memory-lr X] [--value-lr X] [--clip X] [--value-clip X]\n"
               "         [--value-optimizer adam|adagrad] [--no-fused] [--eval-every N]\n"
               "         [--csv FILE] [--seed N] [--threads N] [--help]\n"
               "Trains a model to recall facts and prints its progress; --csv FILE (default\n"
               "train_facts.csv in the current folder) gets one line per model and epoch.\n");
  std::exit(error.empty() ? 0 : 2);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--no-fused") {
      o.fused = false;
      continue;
    }
    if (a == "-h" || a == "--help") usage("");
    if (i + 1 >= argc) usage("flag " + a + " needs a value");
    const std::string v = argv[++i];
    auto num = [&](double lo) {
      char* end = nullptr;
      const double d = std::strtod(v.c_str(), &end);
      if (end == v.c_str() || *end != '\0' || !std::isfinite(d) || d < lo) {
        usage(a + " = '" + v + "', expected a number >= " + std::to_string(lo));
      }
      return d;
    };
    if (a == "--model") {
      if (v != "dense" && v != "memory" && v != "both") usage("--model = '" + v + "', expected dense, memory or both");
      o.model = v;
    } else if (a == "--value-optimizer") {
      if (v != "adam" && v != "adagrad") usage("--value-optimizer = '" + v + "', expected adam or adagrad");
      o.value_optimizer = v;
    } else if (a == "--csv") {
      o.csv = v;
    } else if (a == "--epochs") o.epochs = int(num(1));
    else if (a == "--eval-every") o.eval_every = int(num(1));
    else if (a == "--batch") o.batch = Index(num(1));
    else if (a == "--dim") o.dim = Index(num(2));
    else if (a == "--vocab") o.vocab = Index(num(1));
    else if (a == "--relations") o.relations = Index(num(1));
    else if (a == "--objects") o.objects = Index(num(2));
    else if (a == "--n-keys") o.n_keys = Index(num(1));
    else if (a == "--heads") o.heads = Index(num(1));
    else if (a == "--knn") o.knn = Index(num(1));
    else if (a == "--k-dim") o.k_dim = Index(num(2));
    else if (a == "--dense-lr") o.dense_lr = num(0);
    else if (a == "--memory-lr") o.memory_lr = num(0);
    else if (a == "--value-lr") o.value_lr = num(0);
    else if (a == "--clip") o.clip = num(0);
    else if (a == "--value-clip") o.value_clip = num(0);
    else if (a == "--seed") o.seed = std::uint64_t(num(0));
    else if (a == "--threads") o.threads = int(num(1));
    else usage("unknown flag " + a);
  }
  return o;
}

// ---- the fact set ------------------------------------------------------------------------

struct Facts {
  std::vector<std::int32_t> a, b, r, object;
  Index size() const { return Index(a.size()); }
};

/// Every (a, b, r) with a random object; the same seed gives the same facts everywhere.
Facts make_facts(const Options& o) {
  std::mt19937_64 rng(o.seed);
  Facts f;
  for (Index a = 0; a < o.vocab; ++a) {
    for (Index b = 0; b < o.vocab; ++b) {
      for (Index r = 0; r < o.relations; ++r) {
        f.a.push_back(std::int32_t(a));
        f.b.push_back(std::int32_t(b));
        f.r.push_back(std::int32_t(r));
        f.object.push_back(std::int32_t(rng() % std::uint64_t(o.objects)));
      }
    }
  }
  return f;
}

Mat normal_matrix(Index rows, Index cols, double stddev, std::mt19937_64& rng) {
  std::normal_distribution<float> n(0.0f, float(stddev));
  Mat m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = n(rng);
  return m;
}

// ---- the two blocks ----------------------------------------------------------------------

/// Multiply-adds per token of a Memory+ layer (the top-k's comparisons not counted).
double memory_macs_per_token(const pkm::MemoryConfig& c) {
  return double(c.input_dim * c.heads * c.k_dim)  // query
         + double(c.heads * c.n_keys * c.k_dim)   // half scores, both halves
         + double(c.heads * c.knn * c.v_dim)      // weighted read
         + double(c.input_dim * c.v_dim)          // SiLU gate projection
         + double(c.v_dim * c.output_dim);        // output projection
}

/// f(x) for a batch, its backward (dx written, parameter gradients added) and its update.
struct Block {
  virtual ~Block() = default;
  virtual const char* name() const = 0;
  virtual double macs_per_token() const = 0;
  virtual Index active_params() const = 0;
  virtual Index total_params() const = 0;
  virtual void forward(const Mat& x, Mat& out) = 0;
  virtual void backward(const Mat& x, const Mat& dout, Mat& dx) = 0;
  virtual void register_dense(pkm::optim::AdamW<float>& opt) = 0;
};

/// SwiGLU FFN: out = W2 (silu(W1 x) * (W3 x)).
class DenseFfn final : public Block {
 public:
  DenseFfn(Index dim, Index hidden, std::mt19937_64& rng)
      : dim_(dim), hidden_(hidden),
        w1_(normal_matrix(hidden, dim, 1.0 / std::sqrt(double(dim)), rng)),
        w3_(normal_matrix(hidden, dim, 1.0 / std::sqrt(double(dim)), rng)),
        w2_(normal_matrix(dim, hidden, 1.0 / std::sqrt(double(hidden)), rng)),
        g1_(Mat::Zero(hidden, dim)), g3_(Mat::Zero(hidden, dim)), g2_(Mat::Zero(dim, hidden)) {}

  const char* name() const override { return "dense SwiGLU FFN"; }
  double macs_per_token() const override { return 3.0 * double(dim_ * hidden_); }
  Index active_params() const override { return 3 * dim_ * hidden_; }
  Index total_params() const override { return 3 * dim_ * hidden_; }

  void forward(const Mat& x, Mat& out) override {
    const Index B = x.rows();
    pre1_.resize(B, hidden_);
    pre3_.resize(B, hidden_);
    u_.resize(B, hidden_);
    pkm::linear_forward<float>(x, w1_, nullptr, pre1_);
    pkm::linear_forward<float>(x, w3_, nullptr, pre3_);
    u_ = pre1_.unaryExpr([](float v) { return pkm::silu(v); }).cwiseProduct(pre3_);
    pkm::linear_forward<float>(u_, w2_, nullptr, out);
  }
  void backward(const Mat& x, const Mat& dout, Mat& dx) override {
    const Index B = x.rows();
    pkm::linear_backward_weights<float>(u_, dout, g2_, nullptr);
    Mat du(B, hidden_), d1(B, hidden_), d3(B, hidden_);
    pkm::linear_backward_input<float>(dout, w2_, du, false);
    for (Index i = 0; i < du.size(); ++i) {
      const float p1 = pre1_.data()[i];
      d1.data()[i] = du.data()[i] * pre3_.data()[i] * pkm::silu_grad(p1);
      d3.data()[i] = du.data()[i] * pkm::silu(p1);
    }
    pkm::linear_backward_weights<float>(x, d1, g1_, nullptr);
    pkm::linear_backward_weights<float>(x, d3, g3_, nullptr);
    pkm::linear_backward_input<float>(d1, w1_, dx, false);
    pkm::linear_backward_input<float>(d3, w3_, dx, true);
  }
  void register_dense(pkm::optim::AdamW<float>& opt) override {
    opt.add("ffn.w1", w1_, g1_);
    opt.add("ffn.w3", w3_, g3_);
    opt.add("ffn.w2", w2_, g2_);
  }

 private:
  Index dim_, hidden_;
  Mat w1_, w3_, w2_, g1_, g3_, g2_;
  Mat pre1_, pre3_, u_;
};

/// A pkm Memory+ layer; its value table is updated by its own sparse optimizer, fused with
/// the backward (or after it, with --no-fused).
template <class ValueOptimizer>
class MemoryBlock final : public Block {
 public:
  template <class ValueOptions>
  MemoryBlock(const pkm::MemoryConfig& c, std::uint64_t seed, const ValueOptions& vo, bool fused)
      : layer_(c, seed), grads_(c), values_opt_(layer_.values(), vo), fused_(fused) {}

  const char* name() const override { return "Memory+ layer"; }
  double macs_per_token() const override { return memory_macs_per_token(layer_.config()); }
  Index active_params() const override {
    const auto& c = layer_.config();
    return dense_params() + c.heads * c.knn * c.v_dim;
  }
  Index total_params() const override {
    const auto& c = layer_.config();
    return dense_params() + c.slots() * c.v_dim;
  }

  void forward(const Mat& x, Mat& out) override { layer_.forward(x, out, cache_); }
  void backward(const Mat& x, const Mat& dout, Mat& dx) override {
    if (fused_) {
      layer_.backward_fused(x, cache_, dout, grads_.params, values_opt_, dx);
    } else {
      grads_.values.clear();
      layer_.backward(x, cache_, dout, grads_, dx);
      values_opt_.step(layer_.values(), grads_.values);
    }
  }
  void register_dense(pkm::optim::AdamW<float>& opt) override { opt.add("mem.", layer_.params(), grads_.params); }

 private:
  Index dense_params() const {
    Index n = 0;
    layer_.params().for_each([&](pkm::Tensor, pkm::ConstMatrixMap<float> m) { n += m.size(); });
    return n;
  }

  pkm::MemoryLayer<float> layer_;
  pkm::LayerGradients<float> grads_;
  ValueOptimizer values_opt_;
  bool fused_;
  pkm::ForwardCache<float> cache_;
};

// ---- the model around the block ---------------------------------------------------------

struct Step {
  double loss_sum = 0;
  Index correct = 0;
};

class Model {
 public:
  Model(const Options& o, double lr, std::unique_ptr<Block> block, std::mt19937_64& rng)
      : block_(std::move(block)),
        ea_(normal_matrix(o.vocab, o.dim, 1.0 / std::sqrt(3.0), rng)),
        eb_(normal_matrix(o.vocab, o.dim, 1.0 / std::sqrt(3.0), rng)),
        er_(normal_matrix(o.relations, o.dim, 1.0 / std::sqrt(3.0), rng)),
        wo_(normal_matrix(o.objects, o.dim, 1.0 / std::sqrt(double(o.dim)), rng)),
        bo_(Mat::Zero(1, o.objects)),
        gea_(Mat::Zero(o.vocab, o.dim)), geb_(Mat::Zero(o.vocab, o.dim)), ger_(Mat::Zero(o.relations, o.dim)),
        gwo_(Mat::Zero(o.objects, o.dim)), gbo_(Mat::Zero(1, o.objects)), opt_(adam_options(lr, o.clip)) {
    opt_.add("embed.a", ea_, gea_);
    opt_.add("embed.b", eb_, geb_);
    opt_.add("embed.r", er_, ger_);
    opt_.add("out.weight", wo_, gwo_);
    opt_.add("out.bias", bo_, gbo_);
    block_->register_dense(opt_);
  }

  Block& block() { return *block_; }
  Index embedding_params() const { return ea_.size() + eb_.size() + er_.size(); }
  Index head_params() const { return wo_.size() + bo_.size(); }

  /// Forward over facts[ids], and (train) backward and one optimizer step.
  Step run(const Facts& f, const std::int64_t* ids, Index B, bool train) {
    const Index d = ea_.cols(), O = wo_.rows();
    x_.resize(B, d);
    for (Index i = 0; i < B; ++i) {
      const auto t = ids[i];
      x_.row(i) = ea_.row(f.a[t]) + eb_.row(f.b[t]) + er_.row(f.r[t]);
    }
    fx_.resize(B, d);
    block_->forward(x_, fx_);
    h_ = x_ + fx_;
    logits_.resize(B, O);
    pkm::linear_forward<float>(h_, wo_, bo_.data(), logits_);
    // Softmax cross-entropy; dlogits = (softmax - onehot) / B.
    std::vector<double> loss(B);
    std::vector<char> hit(B);
#pragma omp parallel for schedule(static)
    for (Index i = 0; i < B; ++i) {
      auto z = logits_.row(i).array();
      const Index target = f.object[ids[i]];
      Index best = 0;
      const float mx = z.maxCoeff(&best);
      hit[i] = best == target;
      const double zt = double(z(target) - mx);
      z = (z - mx).exp();  // Eigen's vectorised exp
      const double sum = double(z.sum());
      loss[i] = std::log(sum) - zt;
      if (train) {
        z *= float(1.0 / sum) / float(B);
        z(target) -= 1.0f / float(B);
      }
    }
    Step s;
    for (Index i = 0; i < B; ++i) {
      s.loss_sum += loss[i];
      s.correct += hit[i];
    }
    if (!train) return s;

    opt_.zero_grad();  // every dense gradient, the block's included (register_dense)
    const Mat& dlogits = logits_;
    pkm::linear_backward_weights<float>(h_, dlogits, gwo_, gbo_.data());
    dh_.resize(B, d);
    pkm::linear_backward_input<float>(dlogits, wo_, dh_, false);
    dx_.resize(B, d);
    block_->backward(x_, dh_, dx_);  // the memory block also updates its values here
    dx_ += dh_;                      // the residual path
    for (Index i = 0; i < B; ++i) {
      const auto t = ids[i];
      gea_.row(f.a[t]) += dx_.row(i);
      geb_.row(f.b[t]) += dx_.row(i);
      ger_.row(f.r[t]) += dx_.row(i);
    }
    opt_.step();
    return s;
  }

 private:
  static pkm::optim::AdamOptions adam_options(double lr, double clip) {
    pkm::optim::AdamOptions ao;
    ao.lr = lr;
    ao.max_grad_norm = clip;
    return ao;
  }

  std::unique_ptr<Block> block_;
  Mat ea_, eb_, er_, wo_, bo_;
  Mat gea_, geb_, ger_, gwo_, gbo_;
  pkm::optim::AdamW<float> opt_;
  Mat x_, fx_, h_, logits_, dh_, dx_;
};

// ---- training loop, progress, results -------------------------------------------------------

struct Result {
  std::string label;
  double accuracy = 0, seconds = 0;
  double macs = 0;
  Index active = 0, total = 0;
};

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void progress(const char* label, int epoch, int epochs, double frac, double loss, double acc, double secs) {
  const int width = 30, fill = int(frac * width + 0.5);
  std::string bar(std::size_t(fill), '#');
  bar.resize(std::size_t(width), '.');
  std::fprintf(stderr, "\r%-7s epoch %2d/%d [%s] loss %.3f  acc %5.1f%%  %5.1f s ", label, epoch, epochs,
               bar.c_str(), loss, 100.0 * acc, secs);
  std::fflush(stderr);
}

/// Accuracy over every fact, in batches, without training.
double evaluate(Model& m, const Facts& f, Index batch) {
  std::vector<std::int64_t> ids(std::size_t(f.size()));
  for (Index i = 0; i < f.size(); ++i) ids[std::size_t(i)] = i;
  Index correct = 0;
  for (Index s = 0; s < f.size(); s += batch) {
    correct += m.run(f, ids.data() + s, std::min(batch, f.size() - s), false).correct;
  }
  return double(correct) / double(f.size());
}

Result train(const std::string& label, Model& m, const Facts& f, const Options& o, std::ofstream& csv) {
  Result r;
  r.label = label;
  std::mt19937_64 rng(o.seed + 99);
  std::vector<std::int64_t> order(std::size_t(f.size()));
  for (Index i = 0; i < f.size(); ++i) order[std::size_t(i)] = i;
  const bool tty = isatty(fileno(stderr));
  double train_time = 0;
  for (int e = 1; e <= o.epochs; ++e) {
    for (std::size_t i = order.size() - 1; i > 0; --i) std::swap(order[i], order[rng() % (i + 1)]);
    const double te = now();
    double loss = 0;
    Index correct = 0, seen = 0, steps = 0;
    for (Index s = 0; s < f.size(); s += o.batch) {
      const Index B = std::min(o.batch, f.size() - s);
      const Step st = m.run(f, order.data() + s, B, true);
      loss += st.loss_sum;
      correct += st.correct;
      seen += B;
      if (tty && (++steps % 20 == 0 || seen == f.size())) {
        progress(label.c_str(), e, o.epochs, double(seen) / double(f.size()), loss / double(seen),
                 double(correct) / double(seen), train_time + now() - te);
      }
    }
    train_time += now() - te;
    double eval = -1;
    if (e % o.eval_every == 0 || e == o.epochs) eval = evaluate(m, f, 4096);
    if (!tty) progress(label.c_str(), e, o.epochs, 1.0, loss / double(seen), double(correct) / double(seen), train_time);
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
    pkm::MemoryConfig mc;
    mc.input_dim = o.dim;
    mc.heads = o.heads;
    mc.n_keys = o.n_keys;
    mc.k_dim = o.k_dim;
    mc.knn = o.knn;
    mc.v_dim = o.dim;
    mc.output_dim = o.dim;
    mc.memory_plus = true;
    mc.validate();
    // The dense FFN's hidden width: the same multiply-adds per token as the memory layer.
    const Index hidden = Index(std::llround(memory_macs_per_token(mc) / (3.0 * double(o.dim))));

    std::printf("pkm %s train_facts: %lld facts = %lld x %lld subjects x %lld relations -> %lld objects (seed %llu)\n",
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
    };
    if (o.model != "memory") {
      std::mt19937_64 rng(o.seed + 3);
      std::printf("dense:  SwiGLU FFN, hidden %lld; AdamW lr %g, clip %g\n", (long long)hidden, o.dense_lr, o.clip);
      run_model("dense", o.dense_lr, std::make_unique<DenseFfn>(o.dim, hidden, rng));
    }
    if (o.model != "dense") {
      std::printf("memory: Memory+ layer, %lld^2 = %lld slots, %lld heads, knn %lld, k_dim %lld; AdamW lr %g, clip %g;\n"
                  "        values: %s, lr %g, clip %g, %s\n",
                  (long long)mc.n_keys, (long long)mc.slots(), (long long)mc.heads, (long long)mc.knn,
                  (long long)mc.k_dim, o.memory_lr, o.clip, o.value_optimizer == "adam" ? "lazy Adam" : "row-wise Adagrad", o.value_lr,
                  o.value_clip, o.fused ? "fused with the backward" : "backward then step");
      if (o.value_optimizer == "adam") {
        pkm::optim::AdamOptions vo;
        vo.lr = o.value_lr;
        vo.max_grad_norm = o.value_clip;
        run_model("memory", o.memory_lr, std::make_unique<MemoryBlock<pkm::optim::LazyAdam<float>>>(mc, o.seed + 5, vo, o.fused));
      } else {
        pkm::optim::RowWiseAdagradOptions vo;
        vo.lr = o.value_lr;
        vo.max_grad_norm = o.value_clip;
        run_model("memory", o.memory_lr, std::make_unique<MemoryBlock<pkm::optim::RowWiseAdagrad<float>>>(mc, o.seed + 5, vo, o.fused));
      }
    }

    std::printf("\n| block | MACs/token | active params | total params | facts recalled | train time |\n");
    std::printf("|---|---:|---:|---:|---:|---:|\n");
    for (const Result& r : results) {
      std::printf("| %s | %.0f | %lld | %lld | %.1f%% (%lld) | %.1f s |\n", r.label.c_str(), r.macs,
                  (long long)r.active, (long long)r.total, 100.0 * r.accuracy,
                  (long long)std::llround(r.accuracy * double(facts.size())), r.seconds);
    }
    if (results.size() == 2 && results[0].accuracy > 0) {
      std::printf("\nMemory+ recalls %.2fx the facts of the dense FFN at matched compute.\n",
                  results[1].accuracy / results[0].accuracy);
    }
    std::printf("curves: %s (plot: python3 examples/plot_training.py %s)\n", o.csv.c_str(), o.csv.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_facts: %s\n", e.what());
    return 1;
  }
  return 0;
}
