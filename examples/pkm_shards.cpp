// pkm_shards: split a checkpoint into the column shards of a memory-parallel group, or gather
// shards back into one checkpoint that pkm_run, load_layer and PyTorch load (pkm/io/shards.hpp).
//
//   pkm_shards split  IN.safetensors OUT_PREFIX P         even split over P processes
//   pkm_shards split  IN.safetensors OUT_PREFIX 0,5,37    any split: column offsets
//   pkm_shards gather OUT.safetensors SHARD.safetensors...
#include <pkm/distributed/column_shards.hpp>
#include <pkm/io/shards.hpp>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

namespace {
int usage(bool help) {
  std::fprintf(help ? stdout : stderr,
               "usage: pkm_shards split IN.safetensors OUT_PREFIX P|OFFSETS\n"
               "       pkm_shards gather OUT.safetensors SHARD.safetensors...\n"
               "split writes OUT_PREFIX-shardR-of-P.safetensors for R = 0..P-1: an even split over "
               "P processes,\n"
               "or the comma-separated column offsets 0,...,v_dim of any split; gather joins "
               "shards (any order)\n"
               "into one checkpoint.\n");
  return help ? 0 : 2;
}

std::vector<pkm::Index> parse_offsets(const std::string& s) {
  std::vector<pkm::Index> v;
  std::size_t at = 0;
  while (at <= s.size()) {
    const std::size_t comma = s.find(',', at);
    const std::string item =
        s.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
    char* end = nullptr;
    const long long x = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0')
      throw std::invalid_argument("pkm_shards: '" + s + "' is not P or a list of column offsets");
    v.push_back(x);
    if (comma == std::string::npos) break;
    at = comma + 1;
  }
  return v;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc >= 2 && (std::string(argv[1]) == "-h" || std::string(argv[1]) == "--help"))
    return usage(true);
  if (argc < 4) return usage(false);
  const std::string cmd = argv[1];
  try {
    if (cmd == "split" && argc == 5) {
      const pkm::io::SafetensorsFile f(argv[2]);
      const pkm::Index v_dim = pkm::io::infer_config(f).v_dim;
      std::vector<pkm::Index> offsets = parse_offsets(argv[4]);
      if (offsets.size() == 1) {
        if (offsets[0] < 1 || offsets[0] > v_dim) {
          throw std::invalid_argument("pkm_shards: P = " + std::to_string(offsets[0]) +
                                      "; expected 1 <= P <= v_dim = " + std::to_string(v_dim));
        }
        offsets =
            pkm::distributed::ColumnShards::even(v_dim, static_cast<int>(offsets[0])).offsets();
      }
      const int P = static_cast<int>(offsets.size()) - 1;
      std::vector<std::string> out;
      for (int r = 0; r < P; ++r) {
        out.push_back(std::string(argv[3]) + "-shard" + std::to_string(r) + "-of-" +
                      std::to_string(P) + ".safetensors");
      }
      pkm::io::split_checkpoint(argv[2], offsets, out);
      for (int r = 0; r < P; ++r) {
        std::printf("%s: columns [%lld, %lld)\n", out[r].c_str(), (long long)offsets[r],
                    (long long)offsets[r + 1]);
      }
      return 0;
    }
    if (cmd == "gather") {
      const std::vector<std::string> in(argv + 3, argv + argc);
      pkm::io::gather_shards(in, argv[2]);
      std::printf("%s: %zu shards gathered\n", argv[2], in.size());
      return 0;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return usage(false);
}
