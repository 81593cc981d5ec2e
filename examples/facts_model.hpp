// facts_model.hpp — the model and the fact data of the fact-recall examples (train_facts,
// continual_facts, dict_facts): a fact is a few input symbols (the synthetic facts' words a, b
// and relation r; a dictionary word's letters and a position) and one object; the model
// embeds each input slot's symbol in a small table of its own, sums them, applies one residual
// block (a dense SwiGLU FFN or a pkm Memory+ layer) and reads out the object. Shared by the
// examples, not part of pkm.
#pragma once

#include <pkm/pkm.hpp>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <initializer_list>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "cli.hpp"

namespace facts {

using Mat = pkm::RowMatrix<float>;
using pkm::Index;

// ---- the fact set ------------------------------------------------------------------------

/// Facts of `slots` input symbols each: fact i's are input[i * slots .. i * slots + slots).
struct Facts {
  Index slots = 0;
  std::vector<std::int32_t> input, object;
  Index size() const { return Index(object.size()); }
  const std::int32_t* in(Index i) const { return input.data() + i * slots; }
  void add(std::initializer_list<std::int32_t> symbols, std::int32_t o) { add(symbols.begin(), o); }
  void add(const std::int32_t* symbols, std::int32_t o) {
    input.insert(input.end(), symbols, symbols + slots);
    object.push_back(o);
  }
};

/// What both examples take with the same flags: the fact set's and the model's sizes, the
/// dense gradient clip, the seed and the thread count. Each example's Options derives from it.
struct ModelOptions {
  Index vocab = 100;  // words per subject vocabulary (subjects = vocab^2)
  Index relations = 10;
  Index objects = 1000;
  Index dim = 128;
  Index heads = 4;
  Index n_keys = 256;
  Index k_dim = 64;
  Index knn = 16;
  double clip = 1.0;  // dense gradient norm clip
  std::uint64_t seed = 1;
  int threads = 0;
  pkm::Dtype compute = pkm::Dtype::f32;  // the memory layer's products (--compute f32|bf16)
  pkm::Dtype score_compute = pkm::Dtype::f32;  // its key scores (--score-compute f32|bf16)

  /// The flags, for a usage text.
  static const char* flags() {
    return "[--vocab N] [--relations N] [--objects N] [--dim N] [--n-keys N] [--heads N] [--knn "
           "N]\n"
           "         [--k-dim N] [--clip X] [--seed N] [--threads N] [--compute f32|bf16]\n"
           "         [--score-compute f32|bf16]";
  }
  /// Takes `flag` if it is one of these flags with a word for its value (usage(error) exits).
  template <class Usage>
  bool take_word(const std::string& flag, const std::string& value, Usage&& usage) {
    if (flag != "--compute" && flag != "--score-compute") return false;
    if (value != "f32" && value != "bf16")
      usage(flag + " = '" + value + "', expected f32 or bf16");
    (flag == "--compute" ? compute : score_compute) =
        value == "bf16" ? pkm::Dtype::bf16 : pkm::Dtype::f32;
    return true;
  }
  /// Takes `flag` if it is one of these (num(lo) parses its value as a number >= lo).
  template <class Num>
  bool take(const std::string& flag, Num&& num) {
    if (flag == "--vocab")
      vocab = Index(num(1));
    else if (flag == "--relations")
      relations = Index(num(1));
    else if (flag == "--objects")
      objects = Index(num(2));
    else if (flag == "--dim")
      dim = Index(num(2));
    else if (flag == "--n-keys")
      n_keys = Index(num(1));
    else if (flag == "--heads")
      heads = Index(num(1));
    else if (flag == "--knn")
      knn = Index(num(1));
    else if (flag == "--k-dim")
      k_dim = Index(num(2));
    else if (flag == "--clip")
      clip = num(0);
    else if (flag == "--seed")
      seed = std::uint64_t(num(0));
    else if (flag == "--threads")
      threads = int(num(1, pkmcli::max_threads()));
    else
      return false;
    return true;
  }

  /// The examples' Memory+ layer: d -> d, values of width d.
  pkm::MemoryConfig memory_config() const {
    pkm::MemoryConfig mc;
    mc.input_dim = dim;
    mc.heads = heads;
    mc.n_keys = n_keys;
    mc.k_dim = k_dim;
    mc.knn = knn;
    mc.v_dim = dim;
    mc.output_dim = dim;
    mc.memory_plus = true;
    mc.compute = compute;
    mc.score_compute = score_compute;
    mc.validate();
    return mc;
  }
};

/// The training flags of the examples that train a dense and a memory model side by side
/// (train_facts, dict_facts).
struct TrainOptions {
  Index batch = 512;
  int epochs = 20;
  double dense_lr = 3e-3;   // AdamW, every parameter of the dense model
  double memory_lr = 1e-3;  // AdamW, the memory model's dense parameters (query, keys, W1, W2, ...)
  double value_lr = 0.1;    // the value table's own rate (lazy Adam or row-wise Adagrad)
  double value_clip = 1.0;  // value gradient norm clip (its own)
  std::string model = "both";  // dense | memory | both

  static const char* training_flags() {
    return "[--model dense|memory|both] [--epochs N] [--batch N]\n"
           "         [--dense-lr X] [--memory-lr X] [--value-lr X] [--value-clip X]";
  }
  /// Takes `flag` if it is one of these (num(lo) parses its value as a number >= lo;
  /// usage(error) exits).
  template <class Num, class Usage>
  bool take_training(const std::string& flag, const std::string& value, Num&& num, Usage&& usage) {
    if (flag == "--model") {
      if (value != "dense" && value != "memory" && value != "both")
        usage("--model = '" + value + "', expected dense, memory or both");
      model = value;
    } else if (flag == "--epochs")
      epochs = int(num(1, 1e6));
    else if (flag == "--batch")
      batch = Index(num(1, 1e7));
    else if (flag == "--dense-lr")
      dense_lr = num(0);
    else if (flag == "--memory-lr")
      memory_lr = num(0);
    else if (flag == "--value-lr")
      value_lr = num(0);
    else if (flag == "--value-clip")
      value_clip = num(0);
    else
      return false;
    return true;
  }
};

/// Every (a, b, r) with a random object; the same seed gives the same facts everywhere.
inline Facts make_facts(const ModelOptions& s) {
  std::mt19937_64 rng(s.seed);
  Facts f;
  f.slots = 3;
  for (Index a = 0; a < s.vocab; ++a) {
    for (Index b = 0; b < s.vocab; ++b) {
      for (Index r = 0; r < s.relations; ++r) {
        f.add({std::int32_t(a), std::int32_t(b), std::int32_t(r)},
              std::int32_t(rng() % std::uint64_t(s.objects)));
      }
    }
  }
  return f;
}

/// The facts f[ids[0]], f[ids[1]], ...
inline Facts subset(const Facts& f, const std::vector<std::int64_t>& ids) {
  Facts out;
  out.slots = f.slots;
  for (auto i : ids) out.add(f.in(i), f.object[std::size_t(i)]);
  return out;
}

inline Mat normal_matrix(Index rows, Index cols, double stddev, std::mt19937_64& rng) {
  std::normal_distribution<float> n(0.0f, float(stddev));
  Mat m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = n(rng);
  return m;
}

// ---- the two blocks ----------------------------------------------------------------------

/// The number a command-line flag was given, or usage(message) (which exits) when `text` is
/// not a finite number >= lo.
template <class Usage>
double flag_number(const std::string& flag, const std::string& text, double lo, Usage&& usage,
                   double hi = HUGE_VAL) {
  char* end = nullptr;
  const double d = std::strtod(text.c_str(), &end);
  if (end == text.c_str() || *end != '\0' || !std::isfinite(d) || d < lo || d > hi) {
    usage(flag + " = '" + text + "', expected a number >= " + std::to_string(lo) +
          (hi < HUGE_VAL ? " and <= " + std::to_string(hi) : std::string()));
  }
  return d;
}

/// A comma-separated list of numbers >= lo (and <= hi) given to `flag`, or usage(message)
/// (which exits) on a bad item or an empty list; `what` names the items in the message.
template <class Usage>
std::vector<Index> flag_list(const std::string& flag, const std::string& text, double lo, double hi,
                             const char* what, Usage&& usage) {
  std::vector<Index> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(Index(flag_number(flag, item, lo, usage, hi)));
  if (out.empty()) usage(flag + " = '" + text + "', expected a comma-separated list of " + what);
  return out;
}

/// Reads the command line as flags: `--flag value` pairs, and the valueless flags named in
/// `switches`. take(flag, value, num) takes each one it knows (value is empty for a switch;
/// num(lo[, hi]) parses the value as a number in range) and returns whether it knew it.
/// -h / --help gives usage(""); a missing value or an unknown flag gives usage(error).
template <class Usage, class Take>
void parse_flags(int argc, char** argv, Usage&& usage, std::initializer_list<const char*> switches,
                 Take&& take) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "-h" || a == "--help") usage("");
    std::string v;
    if (std::find(switches.begin(), switches.end(), a) == switches.end()) {
      if (i + 1 >= argc) usage("flag " + a + " needs a value");
      v = argv[++i];
    }
    auto num = [&](double lo, double hi = HUGE_VAL) { return flag_number(a, v, lo, usage, hi); };
    if (!take(a, v, num)) usage("unknown flag " + a);
  }
}

/// Multiply-adds per token of a Memory+ layer (the top-k's comparisons not counted).
inline double memory_macs_per_token(const pkm::MemoryConfig& c) {
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
  /// Copies another block's parameters (of the same kind and shape) into this one's buffers.
  virtual void copy_weights_from(const Block& other) = 0;
};

/// SwiGLU FFN: out = W2 (silu(W1 x) * (W3 x)).
class DenseFfn final : public Block {
 public:
  DenseFfn(Index dim, Index hidden, std::mt19937_64& rng)
      : dim_(dim),
        hidden_(hidden),
        w1_(normal_matrix(hidden, dim, 1.0 / std::sqrt(double(dim)), rng)),
        w3_(normal_matrix(hidden, dim, 1.0 / std::sqrt(double(dim)), rng)),
        w2_(normal_matrix(dim, hidden, 1.0 / std::sqrt(double(hidden)), rng)),
        g1_(Mat::Zero(hidden, dim)),
        g3_(Mat::Zero(hidden, dim)),
        g2_(Mat::Zero(dim, hidden)) {}

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
  void copy_weights_from(const Block& other) override {
    const auto& o = dynamic_cast<const DenseFfn&>(other);
    w1_ = o.w1_;  // same sizes: assigned in place, the optimizer's pointers stay valid
    w3_ = o.w3_;
    w2_ = o.w2_;
  }

 private:
  Index dim_, hidden_;
  Mat w1_, w3_, w2_, g1_, g3_, g2_;
  Mat pre1_, pre3_, u_;
};

/// A pkm Memory+ layer; its value table is updated by its own sparse optimizer (any of
/// pkm::optim's, set with set_value_optimizer), fused with the backward or after it.
class MemoryBlock final : public Block {
 public:
  MemoryBlock(const pkm::MemoryConfig& c, std::uint64_t seed) : layer_(c, seed), grads_(c) {}

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

  /// The value table's optimizer from now on (replacing the previous one and its state).
  template <class Optimizer>
  Optimizer& set_value_optimizer(const typename Optimizer::options_type& options, bool fused) {
    auto u = std::make_unique<Update<Optimizer>>(Optimizer(layer_.values(), options), fused);
    Optimizer& opt = u->opt;
    update_ = std::move(u);
    return opt;
  }

  pkm::MemoryLayer<float>& layer() { return layer_; }
  /// What the last forward read (for slot statistics and selection).
  const pkm::ForwardCache<float>& cache() const { return cache_; }

  /// From now on the forward reads a copy of the table quantized to `format` (inference only:
  /// a training step is refused), or the trained table again (std::nullopt). Returns the
  /// bytes of the table the forward reads.
  Index serve_quantized(std::optional<pkm::Dtype> format) {
    quantized_.reset();
    if (!format) return Index(sizeof(float)) * layer_.values().rows() * layer_.values().dim();
    quantized_ = std::make_unique<pkm::MemoryLayer<float, pkm::Quantized>>(
        layer_.params(), pkm::quantize(layer_.values(), *format));
    return quantized_->values().bytes();
  }

  void forward(const Mat& x, Mat& out) override {
    if (quantized_) {
      quantized_->forward(x, out, cache_);
    } else {
      layer_.forward(x, out, cache_);
    }
  }
  void backward(const Mat& x, const Mat& dout, Mat& dx) override {
    if (quantized_) throw std::logic_error("MemoryBlock: serving a quantized table; no training");
    if (!update_) throw std::logic_error("MemoryBlock: no value optimizer set");
    update_->backward(layer_, x, cache_, dout, grads_, dx);
  }
  void register_dense(pkm::optim::AdamW<float>& opt) override {
    opt.add("mem.", layer_.params(), grads_.params);
  }
  void copy_weights_from(const Block& other) override {
    const auto& o = dynamic_cast<const MemoryBlock&>(other);
    for (int t = 0; t < pkm::kNumTensors; ++t) {
      if (layer_.params().has(pkm::Tensor(t)))
        layer_.params().matrix(pkm::Tensor(t)) = o.layer_.params().matrix(pkm::Tensor(t));
    }
    layer_.values().matrix() = o.layer_.values().matrix();
  }

 private:
  struct UpdateBase {
    virtual ~UpdateBase() = default;
    virtual void backward(pkm::MemoryLayer<float>& layer, const Mat& x,
                          const pkm::ForwardCache<float>& cache, const Mat& dout,
                          pkm::LayerGradients<float>& grads, Mat& dx) = 0;
  };
  template <class Optimizer>
  struct Update final : UpdateBase {
    Update(Optimizer o, bool f) : opt(std::move(o)), fused(f) {}
    void backward(pkm::MemoryLayer<float>& layer, const Mat& x,
                  const pkm::ForwardCache<float>& cache, const Mat& dout,
                  pkm::LayerGradients<float>& grads, Mat& dx) override {
      if (fused) {
        layer.backward_fused(x, cache, dout, grads.params, opt, dx);
      } else {
        grads.values.clear();
        layer.backward(x, cache, dout, grads, dx);
        opt.step(layer.values(), grads.values);
      }
    }
    Optimizer opt;
    bool fused;
  };

  Index dense_params() const {
    Index n = 0;
    layer_.params().for_each([&](pkm::Tensor, pkm::ConstMatrixMap<float> m) { n += m.size(); });
    return n;
  }

  pkm::MemoryLayer<float> layer_;
  std::unique_ptr<pkm::MemoryLayer<float, pkm::Quantized>> quantized_;
  pkm::LayerGradients<float> grads_;
  std::unique_ptr<UpdateBase> update_;
  pkm::ForwardCache<float> cache_;
};

// ---- the model around the block ---------------------------------------------------------

struct Step {
  double loss_sum = 0;
  Index correct = 0;
};

class Model {
 public:
  /// The synthetic facts' model: slots a, b (vocab words each) and r (relations words).
  Model(const ModelOptions& o, double lr, std::unique_ptr<Block> block, std::mt19937_64& rng)
      : Model({o.vocab, o.vocab, o.relations}, o.objects, o.dim, lr, o.clip, std::move(block),
              rng) {}
  /// One embedding table per input slot, of slot_vocab[s] symbols; `objects` outputs.
  Model(const std::vector<Index>& slot_vocab, Index objects, Index dim, double lr, double clip,
        std::unique_ptr<Block> block, std::mt19937_64& rng)
      : block_(std::move(block)), opt_(adam_options(lr, clip)) {
    const double stddev = 1.0 / std::sqrt(double(slot_vocab.size()));
    for (Index v : slot_vocab) {
      embed_.push_back(normal_matrix(v, dim, stddev, rng));
      gembed_.push_back(Mat::Zero(v, dim));
    }
    wo_ = normal_matrix(objects, dim, 1.0 / std::sqrt(double(dim)), rng);
    bo_ = Mat::Zero(1, objects);
    gwo_ = Mat::Zero(objects, dim);
    gbo_ = Mat::Zero(1, objects);
    for (std::size_t s = 0; s < embed_.size(); ++s)
      opt_.add("embed." + std::to_string(s), embed_[s], gembed_[s]);
    opt_.add("out.weight", wo_, gwo_);
    opt_.add("out.bias", bo_, gbo_);
    block_->register_dense(opt_);
  }

  Block& block() { return *block_; }
  /// false: a training step leaves every dense parameter (embeddings, read-out, the block's
  /// dense tensors) as it is; only what the block's backward updates itself (a memory
  /// block's value table) learns.
  void set_update_dense(bool on) { update_dense_ = on; }
  /// Copies every parameter of `other` (a model of the same shape and block) into this one.
  void copy_weights_from(const Model& other) {
    for (std::size_t s = 0; s < embed_.size(); ++s) embed_[s] = other.embed_[s];
    wo_ = other.wo_;
    bo_ = other.bo_;
    block_->copy_weights_from(*other.block_);
  }
  Index embedding_params() const {
    Index n = 0;
    for (const Mat& e : embed_) n += e.size();
    return n;
  }
  Index head_params() const { return wo_.size() + bo_.size(); }

  /// Forward over facts[ids], and (train) backward and one optimizer step; before_backward,
  /// if set, runs between the forward and the backward (to look at what the forward read).
  /// hits, if given, gets for each of the B facts whether its object was the best logit.
  Step run(const Facts& f, const std::int64_t* ids, Index B, bool train,
           const std::function<void()>& before_backward = {}, char* hits = nullptr) {
    const Index d = wo_.cols(), O = wo_.rows(), S = Index(embed_.size());
    if (f.slots != S) throw std::invalid_argument("Model::run: facts of the wrong slot count");
    x_.resize(B, d);
    for (Index i = 0; i < B; ++i) {
      const std::int32_t* in = f.in(ids[i]);
      x_.row(i) = embed_[0].row(in[0]);
      for (Index s = 1; s < S; ++s) x_.row(i) += embed_[std::size_t(s)].row(in[s]);
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
    if (hits) std::copy(hit.begin(), hit.end(), hits);
    if (!train) return s;

    if (before_backward) before_backward();
    opt_.zero_grad();  // every dense gradient, the block's included (register_dense)
    const Mat& dlogits = logits_;
    pkm::linear_backward_weights<float>(h_, dlogits, gwo_, gbo_.data());
    dh_.resize(B, d);
    pkm::linear_backward_input<float>(dlogits, wo_, dh_, false);
    dx_.resize(B, d);
    block_->backward(x_, dh_, dx_);  // the memory block also updates its values here
    dx_ += dh_;                      // the residual path
    for (Index i = 0; i < B; ++i) {
      const std::int32_t* in = f.in(ids[i]);
      for (Index s = 0; s < S; ++s) gembed_[std::size_t(s)].row(in[s]) += dx_.row(i);
    }
    if (update_dense_) opt_.step();
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
  std::vector<Mat> embed_, gembed_;  // one table per input slot, and its gradient
  Mat wo_, bo_, gwo_, gbo_;
  pkm::optim::AdamW<float> opt_;
  bool update_dense_ = true;
  Mat x_, fx_, h_, logits_, dh_, dx_;
};

// ---- progress and evaluation ---------------------------------------------------------------

inline double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

inline void progress(const char* label, int epoch, int epochs, double frac, double loss, double acc,
                     double secs) {
  const int width = 30, fill = int(frac * width + 0.5);
  std::string bar(std::size_t(fill), '#');
  bar.resize(std::size_t(width), '.');
  std::fprintf(stderr, "\r%-7s epoch %2d/%d [%s] loss %.3f  acc %5.1f%%  %5.1f s ", label, epoch,
               epochs, bar.c_str(), loss, 100.0 * acc, secs);
  std::fflush(stderr);
}

/// One training epoch over every fact: `order` (the facts' ids, kept from epoch to epoch) is
/// shuffled with rng, then trained on in batches, with a progress bar on a terminal. Returns the
/// training loss and accuracy summed over the epoch; `seconds` gets the epoch's training time
/// added.
inline Step train_epoch(Model& m, const Facts& f, std::vector<std::int64_t>& order, Index batch,
                        std::mt19937_64& rng, const char* label, int epoch, int epochs,
                        double& seconds) {
  for (std::size_t i = order.size() - 1; i > 0; --i) std::swap(order[i], order[rng() % (i + 1)]);
  const bool tty = isatty(fileno(stderr));
  const double te = now();
  Step total;
  Index seen = 0, steps = 0;
  for (Index s = 0; s < f.size(); s += batch) {
    const Index B = std::min(batch, f.size() - s);
    const Step st = m.run(f, order.data() + s, B, true);
    total.loss_sum += st.loss_sum;
    total.correct += st.correct;
    seen += B;
    if (tty && (++steps % 20 == 0 || seen == f.size())) {
      progress(label, epoch, epochs, double(seen) / double(f.size()), total.loss_sum / double(seen),
               double(total.correct) / double(seen), seconds + now() - te);
    }
  }
  seconds += now() - te;
  if (!tty) {
    progress(label, epoch, epochs, 1.0, total.loss_sum / double(std::max<Index>(seen, 1)),
             double(total.correct) / double(std::max<Index>(seen, 1)), seconds);
  }
  return total;
}

/// Accuracy over every fact, in batches, without training.
inline double evaluate(Model& m, const Facts& f, Index batch) {
  std::vector<std::int64_t> ids(std::size_t(f.size()));
  for (Index i = 0; i < f.size(); ++i) ids[std::size_t(i)] = i;
  Index correct = 0;
  for (Index s = 0; s < f.size(); s += batch) {
    correct += m.run(f, ids.data() + s, std::min(batch, f.size() - s), false).correct;
  }
  return double(correct) / double(f.size());
}

}  // namespace facts
