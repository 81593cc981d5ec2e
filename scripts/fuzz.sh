#!/usr/bin/env bash
# Fuzzes pkm's file loaders (tests/fuzz/fuzz_loaders.cpp) with clang's libFuzzer under
# AddressSanitizer + UndefinedBehaviorSanitizer: scripts/fuzz.sh [SECONDS] (default 60).
# Builds in build-fuzz/, starts from the seed corpus tests/fuzz/corpus (never written to; new
# inputs go to build-fuzz/corpus) and stops at the first crash, which libFuzzer saves as
# build-fuzz/crash-*. Needs clang, libclang-rt-14-dev and libomp-dev
# (scripts/install-deps.sh --fuzz installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
CXX=clang++ cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPKM_FUZZ=ON \
  -DPKM_BUILD_TESTS=OFF -DPKM_BUILD_BENCH=OFF -DPKM_BUILD_EXAMPLES=OFF -DPKM_INSTALL=OFF \
  -DCMAKE_DISABLE_FIND_PACKAGE_Torch=ON -DCMAKE_DISABLE_FIND_PACKAGE_MPI=ON -DPKM_CUDA=OFF >/dev/null
cmake --build build-fuzz -j2 --target fuzz_loaders
mkdir -p build-fuzz/corpus
cd build-fuzz
# Every seed once first, then the timed run.
./tests/fuzz/fuzz_loaders -runs=0 ../tests/fuzz/corpus
OMP_NUM_THREADS=1 ./tests/fuzz/fuzz_loaders -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=4096 \
  -print_final_stats=1 corpus ../tests/fuzz/corpus
