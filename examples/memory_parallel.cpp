// memory_parallel: the quickstart's layer (512^2 slots x 1024 values, 1 GiB of fp32) with its
// value table split by columns over the processes of an MPI job — memory parallelism, as
// "Memory Layers at Scale" shards its tables. Each process holds 1/P of the table and has its
// own batch of tokens; it prints each process's share of the table, the bytes it sends per
// token (measured, and by the formula of docs/distributed.md), and the times of training
// steps (forward, backward fused with row-wise Adagrad on the table, dense gradients summed).
//
//   mpirun -np 2 build/examples/memory_parallel            (as root: --allow-run-as-root)
#include <mpi.h>
#include <omp.h>

#include <pkm/distributed.hpp>
#include <pkm/distributed/checkpoint.hpp>
#include <pkm/pkm.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {
struct Options {
  long long batch = 1024, steps = 3, n_keys = 512, v_dim = 1024;
  std::string save;  // prefix of the shard files to write at the end, if any
};

bool parse(int argc, char** argv, Options& o, bool& help) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      help = true;
      return true;
    }
    if (a == "--save" && i + 1 < argc) {
      o.save = argv[++i];
      continue;
    }
    long long* target = a == "--batch"    ? &o.batch
                        : a == "--steps"  ? &o.steps
                        : a == "--n-keys" ? &o.n_keys
                        : a == "--v-dim"  ? &o.v_dim
                                          : nullptr;
    if (target == nullptr || i + 1 >= argc) return false;
    char* end = nullptr;
    *target = std::strtoll(argv[++i], &end, 10);
    if (*end != '\0' || *target < 1 || *target > (1 << 20)) return false;
  }
  return true;
}

double max_over_group(const pkm::distributed::Group& g, double v) {
  MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_DOUBLE, MPI_MAX, g.comm());
  return v;
}
}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  int status = 0;
  {
    pkm::distributed::Group group(MPI_COMM_WORLD);
    const int me = group.rank(), P = group.size();
    Options o;
    bool help = false;
    if (!parse(argc, argv, o, help) || help) {
      if (me == 0) {
        std::fprintf(
            help ? stdout : stderr,
            "usage: mpirun -np P memory_parallel [--batch TOKENS_PER_PROCESS] [--steps N] "
            "[--n-keys N] [--v-dim N]\n"
            "                                    [--save PREFIX]\n"
            "The quickstart's layer (default 512^2 slots x 1024 values) split by columns over P "
            "processes;\n"
            "prints each process's table share, bytes sent per token and step times. --save writes "
            "each\n"
            "process's shard to PREFIX-shardR-of-P.safetensors (pkm_shards gather joins them).\n");
      }
      MPI_Finalize();
      return help ? 0 : 2;
    }
    pkm::MemoryConfig cfg;
    cfg.input_dim = 1024;
    cfg.heads = 4;
    cfg.n_keys = o.n_keys;
    cfg.k_dim = 512;
    cfg.knn = 32;
    cfg.v_dim = o.v_dim;
    cfg.output_dim = 1024;
    using clock = std::chrono::steady_clock;
    auto seconds = [](clock::time_point a, clock::time_point b) {
      return std::chrono::duration<double>(b - a).count();
    };

    try {
      auto t0 = clock::now();
      // [layer]
      // Every process: the same config, split and seed; each keeps only its columns.
      const auto shards =
          pkm::distributed::ColumnShards::even(cfg.v_dim, P);  // or from_offsets({...})
      pkm::distributed::MemoryParallelLayer<float> layer(group, cfg, shards, /*seed=*/2024);
      pkm::optim::RowWiseAdagradOptions ao;
      ao.lr = 1e-2;
      pkm::optim::RowWiseAdagrad<float> value_opt(layer.values(),
                                                  ao);  // for this process's columns
      // [/layer]
      const double init_s = max_over_group(group, seconds(t0, clock::now()));
      const double table_gib =
          double(layer.values().rows() * layer.values().dim() * sizeof(float)) / (1 << 30);
      if (me == 0) {
        std::printf("pkm %s memory_parallel: %d processes x %d OpenMP threads\n",
                    PKM_VERSION_STRING, P, omp_get_max_threads());
        std::printf(
            "layer: %lld slots x %lld values = %.2f GiB table (fp32), split %s; initialised in "
            "%.2f s\n",
            (long long)cfg.slots(), (long long)cfg.v_dim,
            table_gib * double(cfg.v_dim) / double(layer.values().dim()),
            shards.to_string().c_str(), init_s);
      }
      for (int q = 0; q < P; ++q) {  // in process order
        if (q == me) {
          std::printf(
              "  process %d: columns [%lld, %lld), table shard %.3f GiB, %lld tokens per step\n",
              me, (long long)layer.column_begin(), (long long)layer.column_end(), table_gib,
              o.batch);
          std::fflush(stdout);
        }
        MPI_Barrier(group.comm());
      }

      std::mt19937_64 rng(7 + static_cast<unsigned>(me));
      std::normal_distribution<float> normal(0.0f, 1.0f);
      pkm::RowMatrix<float> x(o.batch, cfg.input_dim), dout(o.batch, cfg.output_dim),
          y(o.batch, cfg.output_dim);
      for (pkm::Index i = 0; i < x.size(); ++i) x.data()[i] = normal(rng);
      for (pkm::Index i = 0; i < dout.size(); ++i) dout.data()[i] = 1e-3f * normal(rng);
      pkm::distributed::ParallelForwardCache<float> cache;
      pkm::LayerParameters<float> dparams(cfg);
      pkm::RowMatrix<float> dx(o.batch, cfg.input_dim);

      for (long long step = 0; step <= o.steps; ++step) {  // step 0 warms up (first-touch, buffers)
        dparams.set_zero();
        const std::uint64_t b0 = group.bytes_sent();
        MPI_Barrier(group.comm());
        auto a = clock::now();
        // [step]
        // Each process its own tokens x (B x input_dim; B may differ between processes).
        layer.forward(x, y, cache);
        // ... the model's forward and backward to dout ...
        auto b = clock::now();
        const std::uint64_t b1 = group.bytes_sent();
        layer.backward_fused(x, cache, dout, dparams, value_opt, dx);  // the table: one group step
        auto c = clock::now();
        const std::uint64_t b2 = group.bytes_sent();
        layer.sum_gradients(dparams);  // dense gradients summed over the group (or your DP engine)
        // ... the dense optimizer step on layer.params() with dparams, the same everywhere ...
        // [/step]
        auto d = clock::now();
        const std::uint64_t b3 = group.bytes_sent();
        const double f = max_over_group(group, seconds(a, b)),
                     bw = max_over_group(group, seconds(b, c)),
                     s = max_over_group(group, seconds(c, d));
        if (me == 0 && step == 0) std::printf("step 0 (warm-up) %.3f s\n", f + bw + s);
        if (me == 0 && step > 0) {
          const double tokens = double(o.batch) * P;
          std::printf(
              "step %lld: forward %.3f s, backward+update %.3f s, dense gradient sum %.3f s: %.0f "
              "tokens/s "
              "(the group's %.0f tokens)\n",
              step, f, bw, s, tokens / (f + bw + s), tokens);
        }
        if (me == 0 && step == o.steps) {
          const auto t = pkm::distributed::shard_traffic_per_token(cfg.bag_size(), cfg.v_dim,
                                                                   layer.values().dim(), P);
          // Row-wise Adagrad sums each touched row's statistic over the group: 2 (P-1)/P 8 U bytes.
          const double rows = double(cache.shard.bag.segments.size());
          const double stats = 2.0 * (P - 1) / P * 8.0 * rows / double(o.batch);
          std::printf(
              "bytes sent by process 0 per token of its own: forward %.0f (formula %.0f), backward "
              "%.0f "
              "(formula %.0f + %.0f for row-wise Adagrad's statistics of the %.0f rows touched); "
              "dense "
              "gradient sum %.2f MB per step\n",
              double(b1 - b0) / double(o.batch), t.forward, double(b2 - b1) / double(o.batch),
              t.backward, stats, rows, double(b3 - b2) / 1e6);
        }
      }
      if (!o.save.empty()) {
        // [save]
        pkm::distributed::save_shard(pkm::distributed::shard_path(o.save, me, P), layer);
        // [/save]
        if (me == 0)
          std::printf("saved %s .. %s\n", pkm::distributed::shard_path(o.save, 0, P).c_str(),
                      pkm::distributed::shard_path(o.save, P - 1, P).c_str());
      }
    } catch (const std::exception& e) {
      std::fprintf(stderr, "memory_parallel (process %d): %s\n", me, e.what());
      status = 1;
    }
  }
  MPI_Finalize();
  return status;
}
