#!/usr/bin/env bash
# Measures how a mapped value table is served when its pages are not in memory: the disk's own
# random-read limit, then serve_memory's decode loop for each way of fetching the rows
# (pkm/io/mapped_table.hpp), cold (the file's pages dropped from the page cache) and warm (the
# whole file cached), and, where a memory cgroup can be made (root, cgroup v1 or v2), cold
# again with the process's memory (page cache included) limited below the table's size.
#
#   scripts/serve-cold.sh [--build build] [--file serve_demo.safetensors] [--tokens 1000]
#                         [--batch 1] [--limit-mib 256] [--max-seconds 60]
#
# The file is written (a random quickstart-shape layer, 1 GiB fp32 table) if it does not exist;
# it must live on a disk, not on tmpfs. Run with nothing else on the machine.
set -euo pipefail
build=build file=serve_demo.safetensors tokens=1000 batch=1 limit_mib=256 max_seconds=60
while [[ $# -gt 0 ]]; do
  case "$1" in
    --build) build=$2; shift 2 ;;
    --file) file=$2; shift 2 ;;
    --tokens) tokens=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --limit-mib) limit_mib=$2; shift 2 ;;
    --max-seconds) max_seconds=$2; shift 2 ;;
    *) echo "serve-cold.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
serve="$build/examples/serve_memory"
[[ -x "$serve" ]] || { echo "serve-cold.sh: $serve not built" >&2; exit 2; }
[[ -f "$file" ]] || "$serve" --write-demo "$file"
lscpu | grep -m1 'Model name' || true
echo "file: $file ($(du -h "$file" | cut -f1)), $tokens tokens, batch $batch"
"$serve" --checkpoint "$file" --tokens 1 --disk-limit 5 2>/dev/null | grep '^disk limit'

# A memory cgroup to run in, if one can be made here.
cgroup=""
if [[ $(id -u) == 0 ]]; then
  v1=/sys/fs/cgroup/memory$(awk -F: '$2=="memory"{print $3}' /proc/self/cgroup)
  v2=/sys/fs/cgroup$(awk -F: '$1=="0"{print $3}' /proc/self/cgroup)
  if [[ -w "$v1" && -f "$v1/memory.limit_in_bytes" ]]; then
    cgroup="$v1/pkm-serve-cold"
    mkdir -p "$cgroup" && echo $((limit_mib << 20)) > "$cgroup/memory.limit_in_bytes" || cgroup=""
  elif [[ -f "$v2/cgroup.controllers" ]] && grep -qw memory "$v2/cgroup.controllers"; then
    cgroup="$v2/pkm-serve-cold"
    mkdir -p "$cgroup" && echo $((limit_mib << 20)) > "$cgroup/memory.max" || cgroup=""
  fi
fi
cleanup() { [[ -n "$cgroup" ]] && rmdir "$cgroup" 2>/dev/null || true; }
trap cleanup EXIT

run() {  # run MODE FETCH [cgroup]: prints "tokens/s p50 p99 resident"
  local out
  out=$(if [[ $# -gt 2 ]]; then
          bash -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' _ "$cgroup" \
            "$serve" --checkpoint "$file" --tokens "$tokens" --batch "$batch" --fetch "$2" \
            --max-seconds "$max_seconds" $1
        else
          "$serve" --checkpoint "$file" --tokens "$tokens" --batch "$batch" --fetch "$2" \
            --max-seconds "$max_seconds" $1
        fi 2>/dev/null)
  local tps p50 p99 res
  tps=$(sed -n 's/^throughput: \([0-9]*\) tokens.*/\1/p' <<<"$out")
  p50=$(sed -n 's/.*p50 \([0-9]*\) us.*/\1/p' <<<"$out")
  p99=$(sed -n 's/.*p99 \([0-9]*\) us.*/\1/p' <<<"$out")
  res=$(sed -n 's/^resident: \([0-9]*\) MiB.*/\1/p' <<<"$out")
  printf '%8s tok/s  p50 %8s us  p99 %8s us  resident %5s MiB' "$tps" "$p50" "$p99" "$res"
}

printf '%-12s | %-66s | %s\n' fetch "cold (pages dropped)" "warm (file cached)"
for fetch in page_faults random early; do
  cold=$(run --cold "$fetch")
  cat "$file" > /dev/null
  warm=$(run "" "$fetch")
  printf '%-12s | %s | %s\n' "$fetch" "$cold" "$warm"
done
if [[ -n "$cgroup" ]]; then
  echo "cold, in a memory cgroup of $limit_mib MiB (page cache included):"
  for fetch in page_faults random early; do
    printf '%-12s | %s\n' "$fetch" "$(run --cold "$fetch" cg)"
  done
else
  echo "no memory cgroup could be made here (needs root and a writable cgroup memory controller)"
fi
