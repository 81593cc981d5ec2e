// pkm_quantize — quantizes the value table of a safetensors checkpoint to int8, int4 or fp8
// rows (docs/quantization.md), a block of rows at a time: the input is only read, and no
// second full-precision copy of the table is held.
//
//   pkm_quantize --input CKPT.safetensors --output OUT.safetensors --format int8|int4|fp8
//                [--prefix P] [--threads N]
#include <pkm/io/quantize.hpp>

#include <omp.h>

#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

#include "cli.hpp"

namespace {
const char* kUsage =
    "usage: pkm_quantize --input CKPT.safetensors --output OUT.safetensors --format int8|int4|fp8\n"
    "                    [--prefix P] [--threads N]\n"
    "Writes OUT: CKPT with its value table (P + values.weight, F32/BF16/F16) quantized row by\n"
    "row; every other tensor and the metadata as they are. int8 and int4 rows are FBGEMM's\n"
    "fused row-wise layouts (scale and bias per row), fp8 rows e4m3 with a per-row scale.\n"
    "pkm_run and pkm::io::load_layer<float, pkm::Quantized> read the result.\n";

[[noreturn]] void die(const std::string& msg) {
  std::fprintf(stderr, "pkm_quantize: %s\n", msg.c_str());
  std::exit(2);
}
}  // namespace

int main(int argc, char** argv) {
  std::string input, output, prefix;
  std::optional<pkm::Dtype> format;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) die(a + " needs a value");
      return argv[++i];
    };
    if (a == "--input") {
      input = value();
    } else if (a == "--output") {
      output = value();
    } else if (a == "--prefix") {
      prefix = value();
    } else if (a == "--format") {
      const std::string v = value();
      format = pkm::parse_quantized_dtype(v);
      if (!format) die("--format " + v + ": expected int8, int4 or fp8");
    } else if (a == "--threads") {
      const long long n = pkmcli::whole_number(a, value(), 1, LLONG_MAX, die);
      if (const std::string e = pkmcli::threads_error(n); !e.empty()) die(e);
      omp_set_num_threads(int(n));
    } else if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    } else {
      die("unknown argument '" + a + "' (see --help)");
    }
  }
  if (input.empty() || output.empty() || !format) {
    die("--input, --output and --format are required (see --help)");
  }
  try {
    const auto t0 = std::chrono::steady_clock::now();
    const pkm::io::QuantizeReport r = pkm::io::quantize_checkpoint(input, output, *format, prefix);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr,
                 "pkm_quantize: %lld x %lld table to %s: %.1f MiB -> %.1f MiB (%.2fx smaller) "
                 "in %.2f s -> %s\n",
                 (long long)r.rows, (long long)r.dim, pkm::dtype_name(*format),
                 double(r.table_bytes_before) / (1 << 20), double(r.table_bytes_after) / (1 << 20),
                 double(r.table_bytes_before) / double(r.table_bytes_after), s, output.c_str());
  } catch (const std::exception& e) {
    die(e.what());
  }
  return 0;
}
