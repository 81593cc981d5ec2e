#!/usr/bin/env python3
"""Plots train_facts curves: facts recalled and training loss against epochs, per model.

  build/examples/train_facts --csv train_facts.csv
  python3 examples/plot_training.py train_facts.csv docs/training.png

The CSV has model,epoch,seconds,train_loss,train_accuracy,recalled (recalled is empty on
epochs without a full evaluation). Needs gnuplot (Debian: apt-get install gnuplot-nox).
"""
import csv
import os
import subprocess
import sys
import tempfile


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    src = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) == 3 else os.path.splitext(src)[0] + ".png"
    runs = {}
    with open(src) as f:
        for row in csv.DictReader(f):
            runs.setdefault(row["model"], []).append(row)
    if not runs:
        sys.exit("no rows in " + src)
    files = []
    for model, rows in runs.items():
        d = tempfile.NamedTemporaryFile("w", suffix=".dat", delete=False)
        # columns: epoch, seconds, loss, running train accuracy %, recalled % (or NaN)
        for r in rows:
            rec = float(r["recalled"]) * 100 if r["recalled"] else float("nan")
            d.write("%s %s %s %.3f %.3f\n" % (r["epoch"], r["seconds"], r["train_loss"],
                                               float(r["train_accuracy"]) * 100, rec))
        d.close()
        files.append((model, d.name))
    colors = ["#d95f02", "#1b9e77", "#7570b3", "#e7298a"]
    acc = ", \\\n     ".join(
        "'%s' using 1:4 with lines lw 2 lc rgb '%s' title '%s: accuracy during the epoch', "
        "'%s' using 1:5 with linespoints pt 7 ps 1.2 lw 2 dt 2 lc rgb '%s' title '%s: facts recalled (full pass)'"
        % (path, colors[i % 4], m, path, colors[i % 4], m) for i, (m, path) in enumerate(files))
    loss = ", \\\n     ".join(
        "'%s' using 1:3 with lines lw 2 lc rgb '%s' title '%s'" % (path, colors[i % 4], m)
        for i, (m, path) in enumerate(files))
    script = """
set terminal pngcairo size 1100,460 font 'Sans,11'
set output '%s'
set datafile missing NaN
set multiplot layout 1,2 title 'train\\_facts: dense SwiGLU FFN vs Memory+ layer at matched compute'
set xlabel 'epoch'
set ylabel 'accuracy (%%)'
set yrange [0:100]
set grid
set key right center box opaque
plot %s
set ylabel 'training loss (cross-entropy)'
set yrange [0:*]
set key right top
plot %s
unset multiplot
""" % (out, acc, loss)
    subprocess.run(["gnuplot"], input=script, text=True, check=True)
    for _, path in files:
        os.unlink(path)
    print("wrote", out)


if __name__ == "__main__":
    main()
