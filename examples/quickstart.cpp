// quickstart: one Memory+ layer at the paper's shape scaled to fit a laptop — 512^2 slots of
// 1024 values (1 GiB of fp32), d = 1024, 4 heads, knn 32, k_dim 512 — forward and backward on
// a batch, and what a user wants to see about it.
#include <pkm/pkm.hpp>

#include <omp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

int main(int argc, char** argv) {
  const std::string arg = argc > 1 ? argv[1] : "1024";
  char* end = nullptr;
  const long long parsed = std::strtoll(arg.c_str(), &end, 10);
  if (arg == "-h" || arg == "--help" || *end != '\0' || parsed < 1 || parsed > (1 << 20)) {
    std::fprintf(
        arg == "-h" || arg == "--help" ? stdout : stderr,
        "usage: quickstart [BATCH]   (tokens per batch, 1 to 1048576; default 1024)\n"
        "Builds a Memory+ layer with a 1 GiB table, runs forward and backward, prints times.\n");
    return arg == "-h" || arg == "--help" ? 0 : 2;
  }
  const pkm::Index batch = parsed;

  pkm::MemoryConfig cfg;
  cfg.input_dim = 1024;
  cfg.heads = 4;
  cfg.n_keys = 512;  // 512^2 = 262,144 slots
  cfg.k_dim = 512;
  cfg.knn = 32;
  cfg.v_dim = 1024;
  cfg.output_dim = 1024;
  cfg.memory_plus = true;

  using clock = std::chrono::steady_clock;
  auto seconds = [](clock::time_point a, clock::time_point b) {
    return std::chrono::duration<double>(b - a).count();
  };

  auto t0 = clock::now();
  pkm::MemoryLayer<float> layer(cfg, /*seed=*/2024);
  auto t1 = clock::now();
  std::printf("pkm %s quickstart (%d OpenMP threads)\n", PKM_VERSION_STRING, omp_get_max_threads());
  std::printf("layer: %lld slots x %lld values = %.2f GiB table, %d heads, knn %lld, k_dim %lld\n",
              (long long)cfg.slots(), (long long)cfg.v_dim,
              double(cfg.slots() * cfg.v_dim * sizeof(float)) / (1 << 30), int(cfg.heads),
              (long long)cfg.knn, (long long)cfg.k_dim);
  std::printf("initialised in %.2f s\n", seconds(t0, t1));

  // A batch of token states and an upstream gradient: reproducible pseudo-random numbers
  // (in a model, x is the hidden state entering the layer and dout comes from above).
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  pkm::RowMatrix<float> x(batch, cfg.input_dim), dout(batch, cfg.output_dim);
  for (pkm::Index i = 0; i < x.size(); ++i) x.data()[i] = normal(rng);
  for (pkm::Index i = 0; i < dout.size(); ++i) dout.data()[i] = 1e-3f * normal(rng);

  pkm::ForwardCache<float> cache;
  pkm::RowMatrix<float> y(batch, cfg.output_dim);
  layer.forward(x, y, cache);  // warm-up: first touch of the table's pages
  t0 = clock::now();
  layer.forward(x, y, cache);
  t1 = clock::now();
  const double fwd = seconds(t0, t1);

  pkm::LayerGradients<float> grads(cfg);
  pkm::RowMatrix<float> dx(batch, cfg.input_dim);
  t0 = clock::now();
  layer.backward(x, cache, dout, grads, dx);
  t1 = clock::now();
  const double bwd = seconds(t0, t1);

  const double bytes_read = double(batch * cfg.bag_size() * cfg.v_dim * sizeof(float));
  std::printf("batch %lld tokens: output norm %.4f, mean top weight %.3f\n", (long long)batch,
              double(y.norm()), double(cache.weights.col(0).mean()));
  std::printf(
      "forward  %.1f ms  %.0f tokens/s  (%.2f GB of value rows read, %.1f GB/s over the whole "
      "forward)\n",
      fwd * 1e3, double(batch) / fwd, bytes_read / 1e9, bytes_read / fwd / 1e9);
  std::printf("backward %.1f ms  %.0f tokens/s\n", bwd * 1e3, double(batch) / bwd);
  std::printf(
      "value gradient: %lld of %lld slots touched (%.2f%%), %.1f MiB sparse vs %.1f MiB dense\n",
      (long long)grads.values.size(), (long long)cfg.slots(),
      100.0 * double(grads.values.size()) / double(cfg.slots()),
      double(grads.values.values.size() * sizeof(float)) / (1 << 20),
      double(cfg.slots() * cfg.v_dim * sizeof(float)) / (1 << 20));
  std::printf("input gradient norm %.4e, query weight gradient norm %.4e\n", double(dx.norm()),
              double(grads.params.query_weight().norm()));
  return y.allFinite() && dx.allFinite() ? 0 : 1;
}
