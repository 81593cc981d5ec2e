// pkm_run — the parity tool: runs a memory layer from a PyTorch-made safetensors checkpoint
// on an input and writes what PyTorch would: y, indices, scores and, given dy, dx and the
// gradient of every checkpoint tensor.
//
//   pkm_run --checkpoint CKPT.safetensors --input IN.safetensors --output OUT.safetensors
//           [--knn K] [--qk-norm | --no-qk-norm] [--qk-norm-scale S] [--prefix P] [--threads N]
//           [--forward-only]
// A checkpoint whose value table is quantized (pkm_quantize) runs forward only.
#include <pkm/io/parity.hpp>
#include <pkm/io/paths.hpp>

#include <omp.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

#include "cli.hpp"

namespace {
const char* kUsage =
    "usage: pkm_run --checkpoint CKPT.safetensors --input IN.safetensors --output OUT.safetensors\n"
    "               [--knn K] [--qk-norm | --no-qk-norm] [--qk-norm-scale S] [--prefix P] "
    "[--threads N]\n"
    "               [--forward-only]\n"
    "IN holds x (B, input_dim) and optionally dy (B, output_dim). OUT gets y, indices, scores\n"
    "and, with dy, dx and grad.<name> for every checkpoint tensor. --knn, --qk-norm and\n"
    "--qk-norm-scale override the checkpoint's __metadata__ (mem_knn, qk_norm, qk_norm_scale).\n"
    "--prefix P reads the layer's tensors as P + the reference names (a layer inside a whole\n"
    "model's checkpoint, e.g. layers.4.memory.). --forward-only leaves IN's dy aside. A\n"
    "checkpoint whose table is quantized (pkm_quantize: int8, int4, fp8) runs forward only.\n";

[[noreturn]] void die(const std::string& msg) {
  std::fprintf(stderr, "pkm_run: %s\n", msg.c_str());
  std::exit(2);
}

long long to_int(const std::string& flag, const std::string& v, long long lo) {
  return pkmcli::whole_number(flag, v, lo, LLONG_MAX, die);
}
}  // namespace

int main(int argc, char** argv) {
  std::string checkpoint, input, output;
  pkm::io::LoadOptions options;
  bool forward_only = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) die(a + " needs a value");
      return argv[++i];
    };
    if (a == "--checkpoint")
      checkpoint = value();
    else if (a == "--input")
      input = value();
    else if (a == "--output")
      output = value();
    else if (a == "--knn")
      options.knn = to_int(a, value(), 1);
    else if (a == "--qk-norm")
      options.qk_norm = true;
    else if (a == "--no-qk-norm")
      options.qk_norm = false;
    else if (a == "--qk-norm-scale") {
      const std::string v = value();
      char* end = nullptr;
      const double s = std::strtod(v.c_str(), &end);
      if (v.empty() || *end != '\0') die("--qk-norm-scale " + v + ": expected a number");
      options.qk_norm_scale = s;
    } else if (a == "--threads") {
      const long long n = to_int(a, value(), 1);
      if (const std::string e = pkmcli::threads_error(n); !e.empty()) die(e);
      omp_set_num_threads(int(n));
    } else if (a == "--prefix") {
      options.prefix = value();
    } else if (a == "--forward-only") {
      forward_only = true;
    } else if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    } else {
      die("unknown argument '" + a + "' (see --help)");
    }
  }
  if (checkpoint.empty() || input.empty() || output.empty()) {
    die("--checkpoint, --input and --output are required (see --help)");
  }
  try {
    pkm::io::check_outputs("pkm_run", {{"--output", output}},
                           {{"--checkpoint", checkpoint}, {"--input", input}});
  } catch (const std::exception& e) {
    die(e.what());
  }
  try {
    const pkm::io::SafetensorsFile ckpt(checkpoint), in(input);
    const pkm::io::ParityResult r = pkm::io::run_parity(ckpt, in, options, forward_only);
    r.write(output);
    const auto& c = r.config;
    std::fprintf(stderr,
                 "pkm_run: %lld tokens through %lld heads x knn %lld over %lld slots -> %s\n",
                 (long long)r.get("y").shape[0], (long long)c.heads, (long long)c.knn,
                 (long long)c.slots(), output.c_str());
  } catch (const std::exception& e) {
    die(e.what());
  }
  return 0;
}
