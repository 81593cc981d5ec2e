#!/usr/bin/env bash
# Installs the Debian packages pkm needs to build its tests, benchmarks and examples, if any is
# missing. Needs root or sudo only when something must be installed.
set -euo pipefail

# libblis-openmp-dev: the GEMM backend (pkm/gemm.hpp); pkm builds without it (PKM_BLAS=off).
# libopenmpi-dev, openmpi-bin: pkm::mpi (memory parallelism) and its tests; pkm builds without them.
# --fuzz adds clang with libFuzzer and its OpenMP runtime, for scripts/fuzz.sh.
# --torch adds PyTorch and libtorch (python3-torch libtorch-dev), for pkm::torch, the operator
# library python/pkm_torch.py loads, and the PyTorch tests (skipped without them).
# zlib1g-dev: the real-data example dict_facts reads compressed dictd dictionaries with it.
# --data adds the real data of docs/real_data.md: FreeDict's English-German dictionary and GCIDE
# (dict-freedict-eng-deu dict-gcide: GPL/AGPL data, read where Debian installs it, /usr/share/dictd).
packages=(cmake g++ make libeigen3-dev catch2 libbenchmark-dev nlohmann-json3-dev libblis-openmp-dev libopenmpi-dev openmpi-bin zlib1g-dev)
for option in "$@"; do
  case "$option" in
    --fuzz) packages+=(clang libclang-rt-14-dev libomp-dev) ;;
    --torch) packages+=(python3-torch libtorch-dev) ;;
    --data) packages+=(dict-freedict-eng-deu dict-gcide) ;;
    *) echo "install-deps.sh: unknown option $option (expected --fuzz, --torch or --data)" >&2; exit 2 ;;
  esac
done
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "pkm: all build dependencies are installed (${packages[*]})"
  exit 0
fi

echo "pkm: installing ${missing[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "pkm: need root or sudo to install ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
