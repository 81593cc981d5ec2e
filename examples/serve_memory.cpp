// serve_memory: a memory layer served as a decoding model runs it — a checkpoint loaded with
// its value table mapped from the file (no copy), then a decode loop of N tokens, `batch` at a
// time, from T caller threads at once (each with its own ForwardCache), with K OpenMP threads
// per call. Prints a progress line, then the latency per call (median and 99th percentile),
// tokens per second, and the memory the process holds resident.
//
//   serve_memory --write-demo memory.safetensors [--n-keys 512]   # a random layer to serve
//   serve_memory --checkpoint memory.safetensors [--tokens 2000] [--callers 1] [--threads 2]
//                [--batch 1] [--fetch page_faults|random|early] [--cold] [--disk-limit S]
//                [--max-seconds S]
//
// --fetch says how the mapped table's rows come from the disk (pkm/io/mapped_table.hpp);
// --cold drops the file's pages from the page cache before decoding (posix_fadvise DONTNEED),
// as after a reboot; --disk-limit S first measures, for S seconds, what the disk itself gives:
// 4 KiB random reads of the file at queue depth 32 (32 threads, O_DIRECT, no page cache);
// --max-seconds S stops the decode loop after S seconds (the throughput counts the calls made).
//
// The demo layer has the quickstart's shape (d = 1024, 4 heads, knn 32, k_dim 512, v_dim
// 1024; --n-keys 512 gives a 1 GiB fp32 table). A bf16 table is mapped as bf16, and a
// quantized one (pkm_quantize: int8, int4, fp8) as it is; other dtypes are loaded (converted)
// instead of mapped.
#include <pkm/io/checkpoint.hpp>
#include <pkm/pkm.hpp>

#include <fcntl.h>
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "cli.hpp"

namespace {

[[noreturn]] void die(const std::string& msg) {
  std::fprintf(stderr, "serve_memory: %s\n", msg.c_str());
  std::exit(2);
}

long long parse_count(const std::string& flag, const std::string& v, long long lo, long long hi) {
  return pkmcli::whole_number(flag, v, lo, hi, die);
}

/// The process's memory in MiB from /proc/self/status ("VmRSS:" resident now, "VmHWM:" its
/// peak), or -1.
double status_mib(const char* key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key, 0) == 0) return std::atof(line.c_str() + std::strlen(key)) / 1024.0;
  }
  return -1;
}

template <class TableT>
double table_bytes(const pkm::MemoryLayer<float, TableT>& layer) {
  if constexpr (std::is_same_v<TableT, pkm::Quantized>) {
    return double(layer.values().bytes());
  } else {
    return double(layer.values().rows()) * double(layer.values().dim()) * double(sizeof(TableT));
  }
}
template <class TableT>
const char* table_dtype(const pkm::MemoryLayer<float, TableT>& layer) {
  if constexpr (std::is_same_v<TableT, pkm::Quantized>) {
    return pkm::dtype_name(layer.values().format());
  } else {
    return pkm::dtype_name(pkm::dtype_of<TableT>());
  }
}

struct Options {
  std::string checkpoint;
  long long tokens = 2000, callers = 1, threads = 2, batch = 1;
  pkm::io::TableFetch fetch = pkm::io::TableFetch::page_faults;
  bool cold = false;
  double disk_seconds = 0;
  double max_seconds = 0;  ///< stop issuing calls after this long (0: never)
};

/// The disk's own limit, outside pkm: 4 KiB reads at random 4 KiB-aligned offsets of the file,
/// 32 at a time (32 threads, each one read in flight), through O_DIRECT so that no page cache
/// serves them. Prints reads per second and MB/s.
void disk_limit(const std::string& path, double seconds) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
  if (fd < 0) {
    std::printf("disk limit: cannot open the file with O_DIRECT (%s); not measured\n",
                std::strerror(errno));
    return;
  }
  const off_t blocks = ::lseek(fd, 0, SEEK_END) / 4096;
  std::atomic<long long> reads{0};
  std::atomic<bool> stop{false}, failed{false};
  std::vector<std::thread> pool;
  const auto t0 = std::chrono::steady_clock::now();
  for (int t = 0; t < 32 && blocks > 0; ++t) {
    pool.emplace_back([&, t] {
      std::vector<unsigned char> space(2 * 4096);  // O_DIRECT wants a 4 KiB-aligned buffer
      unsigned char* buf = space.data() + (4096 - reinterpret_cast<std::uintptr_t>(space.data()) % 4096) % 4096;
      std::mt19937_64 rng(std::uint64_t(t) * 7919 + 1);
      while (!stop) {
        const off_t at = off_t(rng() % std::uint64_t(blocks)) * 4096;
        if (::pread(fd, buf, 4096, at) != 4096) {
          failed = true;
          return;
        }
        ++reads;
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  stop = true;
  for (auto& t : pool) t.join();
  ::close(fd);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (failed || reads == 0) {
    std::printf("disk limit: O_DIRECT reads failed here; not measured\n");
    return;
  }
  std::printf("disk limit: %.0f random 4 KiB reads/s at queue depth 32 (%.0f MB/s), O_DIRECT\n",
              double(reads) / s, double(reads) * 4096 / s / 1e6);
}

/// Drops the file's pages from the page cache (those no process has mapped), as a cold start.
void drop_cached(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) die("cannot open " + path + " to drop its cached pages");
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

template <class TableT>
int serve(pkm::io::SafetensorsFile& file, const Options& o, bool mapped) {
  pkm::io::LoadOptions load;
  load.fetch = o.fetch;
  const auto layer = mapped ? pkm::io::load_layer_mapped<float, TableT>(file, load)
                            : pkm::io::load_layer<float, TableT>(file);
  const pkm::MemoryConfig& c = layer.config();
  const double table_mib = table_bytes(layer) / (1 << 20);
  const std::string how = mapped ? std::string("mapped from the file, fetch ") +
                                       pkm::io::table_fetch_name(o.fetch)
                                 : std::string("loaded");
  std::printf("layer: %lld slots x %lld values (%s, %.0f MiB, %s), d %lld, %lld heads, knn %lld\n",
              (long long)c.slots(), (long long)c.v_dim, table_dtype(layer),
              table_mib, how.c_str(), (long long)c.input_dim,
              (long long)c.heads, (long long)c.knn);
  if (o.cold) {
    drop_cached(o.checkpoint);
    std::printf("cold: the file's pages were dropped from the page cache\n");
  }
  std::printf(
      "decoding %lld tokens, %lld per call, from %lld caller thread(s) x %lld OpenMP "
      "thread(s)\n",
      o.tokens, o.batch, o.callers, o.threads);

  const long long calls_total = (o.tokens + o.batch - 1) / o.batch;
  std::vector<std::vector<double>> latency(static_cast<std::size_t>(o.callers));
  std::atomic<long long> done{0};
  std::atomic<bool> failed{false};
  std::string error;
  const auto t0 = std::chrono::steady_clock::now();
  auto caller = [&](long long id) {
    try {
      omp_set_num_threads(int(o.threads));  // this thread's own OpenMP setting
      pkm::ForwardCache<float> cache;       // one per caller: the workspace
      pkm::RowMatrix<float> x(o.batch, c.input_dim), y(o.batch, c.output_dim);
      auto& mine = latency[static_cast<std::size_t>(id)];
      for (long long call = id; call < calls_total && !failed; call += o.callers) {
        if (o.max_seconds > 0 && std::chrono::duration<double>(
                                     std::chrono::steady_clock::now() - t0).count() > o.max_seconds)
          break;
        // A different random "hidden state" per call (seeded by the call: the same run
        // whatever the callers), so the tokens read rows all over the table.
        std::mt19937_64 rng(std::uint64_t(call) + 1);
        std::normal_distribution<float> normal;
        for (pkm::Index e = 0; e < x.size(); ++e) x.data()[e] = normal(rng);
        const auto a = std::chrono::steady_clock::now();
        layer.forward(x, y, cache);
        mine.push_back(
            std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - a)
                .count());
        const long long d = ++done;
        if (id == 0 && (d % std::max(1LL, calls_total / 20) == 0 || d == calls_total)) {
          std::fprintf(stderr, "\r  %lld / %lld calls", d, calls_total);
        }
      }
    } catch (const std::exception& e) {
      if (!failed.exchange(true)) error = e.what();
    }
  };
  std::vector<std::thread> pool;
  for (long long id = 1; id < o.callers; ++id) pool.emplace_back(caller, id);
  caller(0);
  for (auto& t : pool) t.join();
  std::fprintf(stderr, "\n");
  if (failed) die(error);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  std::vector<double> all;
  for (const auto& v : latency) all.insert(all.end(), v.begin(), v.end());
  std::sort(all.begin(), all.end());
  const double p50 = all[all.size() / 2],
               p99 = all[std::min(all.size() - 1, all.size() * 99 / 100)];
  std::printf("latency per call: p50 %.0f us, p99 %.0f us (%zu calls)\n", p50, p99, all.size());
  if (static_cast<long long>(all.size()) < calls_total) {
    std::printf("stopped after %.0f s (--max-seconds): %zu of %lld calls made\n", seconds,
                all.size(), calls_total);
  }
  std::printf("throughput: %.0f tokens/s\n", double(all.size()) * double(o.batch) / seconds);
  std::printf(
      "resident: %.0f MiB, peak %.0f MiB (the table's pages read so far count; the rest of its "
      "%.0f MiB stays in the file)\n",
      status_mib("VmRSS:"), status_mib("VmHWM:"), table_mib);
  return 0;
}

int write_demo(const std::string& path, long long n_keys) {
  pkm::MemoryConfig c;
  c.input_dim = 1024;
  c.heads = 4;
  c.n_keys = n_keys;
  c.k_dim = 512;
  c.knn = std::min<long long>(32, n_keys);
  c.v_dim = 1024;
  c.output_dim = 1024;
  const pkm::MemoryLayer<float> layer(c, 1);
  pkm::io::save_layer(path, layer);
  std::printf("wrote %s: a random layer, %lld slots x %lld values\n", path.c_str(),
              (long long)c.slots(), (long long)c.v_dim);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  std::string demo;
  long long n_keys = 512;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) die(a + " needs a value");
      return argv[++i];
    };
    if (a == "--checkpoint") {
      o.checkpoint = value();
    } else if (a == "--write-demo") {
      demo = value();
    } else if (a == "--n-keys") {
      n_keys = parse_count(a, value(), 2, 4096);
    } else if (a == "--tokens") {
      o.tokens = parse_count(a, value(), 1, 1LL << 40);
    } else if (a == "--callers") {
      o.callers = parse_count(a, value(), 1, 256);
    } else if (a == "--threads") {
      o.threads = parse_count(a, value(), 1, 1 << 20);
      if (const std::string e = pkmcli::threads_error(o.threads); !e.empty()) die(e);
    } else if (a == "--batch") {
      o.batch = parse_count(a, value(), 1, 1 << 16);
    } else if (a == "--fetch") {
      const std::string v = value();
      if (v == "page_faults") o.fetch = pkm::io::TableFetch::page_faults;
      else if (v == "random") o.fetch = pkm::io::TableFetch::random;
      else if (v == "early") o.fetch = pkm::io::TableFetch::early;
      else die("--fetch " + v + ": expected page_faults, random or early");
    } else if (a == "--max-seconds") {
      o.max_seconds = double(parse_count(a, value(), 1, 1 << 20));
    } else if (a == "--cold") {
      o.cold = true;
    } else if (a == "--disk-limit") {
      o.disk_seconds = double(parse_count(a, value(), 1, 600));
    } else {
      die("unknown argument " + a +
          " (serve_memory --write-demo FILE [--n-keys N] | --checkpoint FILE [--tokens N] "
          "[--callers T] [--threads K] [--batch B] [--fetch page_faults|random|early] [--cold] "
          "[--disk-limit S] [--max-seconds S])");
    }
  }
  try {
    if (!demo.empty()) return write_demo(demo, n_keys);
    if (o.checkpoint.empty()) die("--checkpoint FILE (or --write-demo FILE) is required");
    if (o.disk_seconds > 0) disk_limit(o.checkpoint, o.disk_seconds);
    pkm::io::SafetensorsFile file(o.checkpoint);
    const pkm::Dtype table = file.info("values.weight").dtype;
    if (file.metadata().count(pkm::io::kMetaValuesFormat))
      return serve<pkm::Quantized>(file, o, true);
    if (table == pkm::Dtype::bf16) return serve<pkm::bf16>(file, o, true);
    return serve<float>(file, o, table == pkm::Dtype::f32);
  } catch (const std::exception& e) {
    die(e.what());
  }
}
