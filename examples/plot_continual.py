#!/usr/bin/env python3
"""Plots continual_facts results: new facts learned (B) against old facts retained (A), one
curve per method over the finetuning epochs, starting from the pretrained model.

  build/examples/continual_facts --csv continual_facts.csv
  python3 examples/plot_continual.py continual_facts.csv docs/continual.png

The CSV has method,top,epoch,seconds,learned,retained (fractions). Needs gnuplot (Debian:
apt-get install gnuplot-nox).
"""
import csv
import os
import sys

from plot_training import data_file, run_gnuplot  # the same folder


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    src = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) == 3 else os.path.splitext(src)[0] + ".png"
    start = None
    runs = {}
    with open(src) as f:
        for row in csv.DictReader(f):
            if row["method"] == "pretrained":
                start = row
                continue
            label = row["method"] if row["top"] == "0" else "%s, top %s" % (row["method"], row["top"])
            runs.setdefault(label, []).append(row)
    if not runs or start is None:
        sys.exit("no pretrained row or no method rows in " + src)
    files = []
    for label, rows in runs.items():
        points = [start] + rows
        files.append((label, data_file(["%.3f %.3f" % (float(r["learned"]) * 100, float(r["retained"]) * 100)
                                        for r in points])))
    colors = ["#d95f02", "#7570b3", "#1b9e77", "#66a61e", "#e6ab02", "#a6761d", "#e7298a"]
    plots = ", \\\n     ".join(
        "'%s' using 1:2 with linespoints pt 7 ps 1.1 lw 2 lc rgb '%s' title '%s'"
        % (path, colors[i % len(colors)], label.replace("_", "\\\\_")) for i, (label, path) in enumerate(files))
    script = """
set terminal pngcairo size 760,520 font 'Sans,11'
set output '%s'
set title 'continual\\_facts: learning fact set B after A (points: every few epochs)'
set xlabel 'new facts B learned (%%)'
set ylabel 'old facts A retained (%%)'
set xrange [0:100]
set yrange [*:100.5]
set grid
set key left bottom box opaque
plot %s
""" % (out, plots)
    run_gnuplot(script, out, [path for _, path in files])


if __name__ == "__main__":
    main()
