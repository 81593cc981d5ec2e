#!/usr/bin/env python3
"""Plots pkm_bench results: read bandwidth of the gathers against the streaming-read limit;
and, given compare_pytorch.py's JSON, pkm against PyTorch.

  build/bench/pkm_bench --benchmark_repetitions=3 --benchmark_out=results.json --benchmark_out_format=json
  python3 bench/plot_benchmarks.py results.json docs/benchmarks.png
  /usr/bin/python3 bench/compare_pytorch.py --json compare.json
  python3 bench/plot_benchmarks.py --compare compare.json docs/compare_pytorch.png

Needs gnuplot (Debian: apt-get install gnuplot-nox). Uses the medians when repetitions were run.
"""
import json
import os
import subprocess
import sys
import tempfile

# gnuplot settings both plots share: clustered bars from 0, key on the right.
BARS = """
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set key outside right top
set yrange [0:*]
set grid ytics
"""


def medians(path):
    with open(path) as f:
        runs = json.load(f)["benchmarks"]
    out = {}
    for r in runs:
        name = r["name"].replace("/real_time", "")
        if r.get("run_type") == "aggregate":
            if r.get("aggregate_name") != "median":
                continue
            name = name.rsplit("_median", 1)[0]
        elif any(x.get("run_type") == "aggregate" for x in runs):
            continue
        out[name] = r
    return out


def plot_compare(path, png):
    with open(path) as f:
        table = json.load(f)["table"]
    with tempfile.NamedTemporaryFile("w", suffix=".dat", delete=False) as d:
        for what, pkm, torch, unit in table:  # columns: label, pkm / PyTorch, 1
            label = what.split(",")[0].replace("_", " ")  # gnuplot reads _ as a subscript
            d.write('"%s" %.3f 1\n' % (label, pkm / torch))
    script = """
set terminal pngcairo size 1000,420 font 'Sans,11'
set output '%s'
set title 'pkm / PyTorch 1.13 on the same 2 cores (d 1024, 4 heads, knn 32, 512^2 x 1024 table, 2048 tokens)'
set ylabel 'speed-up (PyTorch = 1)'
%splot '%s' using 2:xtic(1) title 'pkm' lc rgb '#1b9e77', '' using 3 title 'PyTorch' lc rgb '#888888'
""" % (png, BARS, d.name)
    subprocess.run(["gnuplot"], input=script, text=True, check=True)
    os.unlink(d.name)
    print("wrote", png)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--compare":
        return plot_compare(sys.argv[2], sys.argv[3])
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    res = medians(sys.argv[1])
    gbs = lambda n: res[n]["bytes_per_second"] / 1e9 if n in res else float("nan")
    stream = gbs("BM_StreamRead")
    rows = []
    for dim in (256, 1024, 4096):
        rows.append((dim, stream, gbs("BM_EmbeddingBagNaive/%d" % dim), gbs("BM_EmbeddingBag/fp32/%d" % dim),
                     gbs("BM_EmbeddingBag/bf16/%d" % dim), gbs("BM_EmbeddingBag/fp16/%d" % dim)))
    with tempfile.NamedTemporaryFile("w", suffix=".dat", delete=False) as d:
        # columns: v_dim, stream, naive, fp32, bf16, fp16 (no header line: gnuplot would plot it)
        for r in rows:
            d.write("%d %.3f %.3f %.3f %.3f %.3f\n" % r)
    script = """
set terminal pngcairo size 1000,480 font 'Sans,11'
set output '%s'
set title 'pkm embedding bag: bytes read per second (4096 tokens x 128 rows, 1 GiB table)'
set ylabel 'GB/s'
set xlabel 'v\\_dim'
%splot '%s' using 2:xtic(1) title 'streaming read (limit)' lc rgb '#888888', \\
     '' using 3 title 'naive loop (fp32)' lc rgb '#d95f02', \\
     '' using 4 title 'pkm fp32' lc rgb '#1b9e77', \\
     '' using 5 title 'pkm bf16' lc rgb '#7570b3', \\
     '' using 6 title 'pkm fp16' lc rgb '#e7298a'
""" % (sys.argv[2], BARS, d.name)
    subprocess.run(["gnuplot"], input=script, text=True, check=True)
    os.unlink(d.name)
    print("wrote", sys.argv[2])


if __name__ == "__main__":
    main()
