#!/usr/bin/env bash
# scripts/gpu-check.sh — verifies pkm's CUDA path (pkm/cuda/embedding_bag.cuh) on a machine
# with an NVIDIA GPU and nvcc, in one command, in a few minutes:
#   1. builds the kernels for this GPU's architecture (ptxas's register and spill report kept),
#      the GPU tests (pkm's CPU ops as the reference) and the benchmark;
#   2. runs the GPU tests;
#   3. runs them again (small shapes) under compute-sanitizer: memcheck, then racecheck;
#   4. runs the benchmark (pkm vs a naive kernel vs a device-to-device copy), and PyTorch's
#      embedding_bag at the same shapes where PyTorch has CUDA;
#   5. writes summary.md and summary.json (and every log) to $OUT, or build-gpu/out.
#
#   scripts/gpu-check.sh             run everything (exit 0 when the tests pass, sanitizers clean)
#   scripts/gpu-check.sh --prepare   on a machine with Eigen (Debian: libeigen3-dev), copy its
#                                    headers to .deps/eigen3 for a GPU machine that lacks them
#
# Needs nvcc (CUDACXX or PATH or /usr/local/cuda/bin), a host C++17 compiler with OpenMP, and
# Eigen 3 headers (EIGEN3_INCLUDE_DIR, .deps/eigen3 or /usr/include/eigen3). Not Catch2, not
# CMake: the GPU machine may have neither.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  src=${EIGEN3_INCLUDE_DIR:-/usr/include/eigen3}
  [ -d "$src/Eigen" ] || { echo "gpu-check: no Eigen headers at $src (set EIGEN3_INCLUDE_DIR)" >&2; exit 2; }
  rm -rf .deps/eigen3 && mkdir -p .deps && cp -r "$src" .deps/eigen3
  echo "gpu-check: copied Eigen to .deps/eigen3 ($(du -sh .deps/eigen3 | cut -f1)); carry .deps to the GPU machine"
  exit 0
fi

out=${OUT:-build-gpu/out}
build=build-gpu
mkdir -p "$out" "$build"
start=$(date +%s)
nvcc=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
cxx=${CXX:-g++}
eigen=${EIGEN3_INCLUDE_DIR:-}
for d in "$eigen" .deps/eigen3 /usr/include/eigen3; do
  if [ -n "$d" ] && [ -d "$d/Eigen" ]; then eigen=$d; break; fi
done
status=0
note() { echo "gpu-check: $*" | tee -a "$out/gpu-check.log"; }

[ -x "$nvcc" ] || { note "no nvcc (set CUDACXX)"; exit 2; }
[ -d "$eigen/Eigen" ] || { note "no Eigen headers: run scripts/gpu-check.sh --prepare where Eigen is installed and carry .deps"; exit 2; }
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt" 2>&1
else
  echo "no nvidia-smi" > "$out/gpu.txt"
fi
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
arch=${arch:-90}
note "GPU: $(head -1 "$out/gpu.txt"); nvcc: $("$nvcc" --version | tail -1); building for sm_$arch"

# 1. Build.
flags=(-std=c++17 -O3 "-arch=sm_$arch" -Iinclude -Werror=all-warnings)
if ! "$nvcc" "${flags[@]}" -Xptxas -v -c tests/cuda/runner.cu -o "$build/runner.o" > "$out/ptxas.log" 2>&1; then
  note "building tests/cuda/runner.cu failed:"; cat "$out/ptxas.log"; exit 1
fi
spills=$(grep -c "bytes spill stores" "$out/ptxas.log" || true)
spilling=$(grep "bytes spill stores" "$out/ptxas.log" | grep -vc " 0 bytes spill stores, 0 bytes spill loads" || true)
"$cxx" -std=c++17 -O2 -fopenmp -Iinclude -I"$eigen" -I"$(dirname "$(dirname "$nvcc")")/include" \
  -c tests/cuda/gpu_tests.cpp -o "$build/gpu_tests.o" || { note "building gpu_tests.cpp failed"; exit 1; }
"$nvcc" "-arch=sm_$arch" "$build/gpu_tests.o" "$build/runner.o" -Xcompiler -fopenmp -o "$build/gpu_tests" || {
  note "linking the GPU tests failed"; exit 1; }
"$nvcc" "${flags[@]}" bench/cuda/bench_cuda.cu -o "$build/bench_cuda" || { note "building bench_cuda failed"; exit 1; }
note "built in $(( $(date +%s) - start )) s; ptxas: $spills kernels, $spilling with spills"
[ "$spilling" = "0" ] || status=1

# 2. The tests.
timeout 300 "$build/gpu_tests" > "$out/tests.log" 2>&1
tests_rc=$?
tail -3 "$out/tests.log"
[ $tests_rc -eq 77 ] && note "the GPU tests found no usable CUDA device: nothing was verified"
[ $tests_rc -eq 0 ] || status=1

# 3. compute-sanitizer (small shapes). A runtime that does not support it is reported as such.
sanitizer=$(command -v compute-sanitizer || echo "$(dirname "$nvcc")/compute-sanitizer")
sanitize() {
  local tool=$1
  if [ ! -x "$sanitizer" ]; then echo "not installed"; return; fi
  PKM_CUDA_TESTS_QUICK=1 timeout 240 "$sanitizer" --tool "$tool" --error-exitcode 3 "$build/gpu_tests" \
    > "$out/sanitizer-$tool.log" 2>&1
  local rc=$?
  if grep -q "Device not supported\|not supported on this" "$out/sanitizer-$tool.log"; then echo "unsupported on this machine"
  elif [ $rc -eq 0 ] && grep -q "ERROR SUMMARY: 0 errors" "$out/sanitizer-$tool.log"; then echo "clean"
  elif [ $rc -eq 124 ]; then echo "timed out"
  else echo "ERRORS (rc $rc)"; fi
}
memcheck=$(sanitize memcheck)
racecheck=$(sanitize racecheck)
note "compute-sanitizer memcheck: $memcheck; racecheck: $racecheck"
case "$memcheck$racecheck" in *ERRORS*) status=1 ;; esac

# 4. The benchmark, and PyTorch where it has CUDA.
timeout 300 "$build/bench_cuda" "$out/bench.json" > "$out/bench.md" 2>&1 || status=1
cat "$out/bench.md"
python3 bench/cuda/compare_torch_cuda.py "$out/torch.json" > "$out/torch.md" 2>&1
cat "$out/torch.md"

# 5. The summary.
{
  echo "# pkm CUDA check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "- GPU: $(head -1 "$out/gpu.txt")"
  echo "- nvcc: $("$nvcc" --version | tail -1), sm_$arch"
  echo "- ptxas: $spills kernels, $spilling with register spills"
  echo "- GPU tests: $(tail -1 "$out/tests.log") (exit $tests_rc)"
  echo "- compute-sanitizer memcheck: $memcheck; racecheck: $racecheck"
  echo "- $(( $(date +%s) - start )) s in all"
  echo
  echo "## Benchmark"
  echo
  cat "$out/bench.md"
  echo
  echo "## PyTorch"
  echo
  cat "$out/torch.md"
} > "$out/summary.md"
python3 - "$out" "$tests_rc" "$spilling" "$memcheck" "$racecheck" <<'EOF'
import json, os, sys
out, tests_rc, spilling, memcheck, racecheck = sys.argv[1:]
def load(name):
    p = os.path.join(out, name)
    return json.load(open(p)) if os.path.exists(p) else None
json.dump({"tests_exit": int(tests_rc), "kernels_spilling": int(spilling), "memcheck": memcheck,
           "racecheck": racecheck, "bench": load("bench.json"), "torch": load("torch.json")},
          open(os.path.join(out, "summary.json"), "w"), indent=1)
EOF
note "summary: $out/summary.md, $out/summary.json; $( [ $status -eq 0 ] && echo PASSED || echo FAILED )"
exit $status
