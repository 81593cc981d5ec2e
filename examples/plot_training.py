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


def data_file(lines):
    """A temporary gnuplot data file holding `lines`; returns its path."""
    with tempfile.NamedTemporaryFile("w", suffix=".dat", delete=False) as d:
        d.write("".join(line + "\n" for line in lines))
    return d.name


def run_gnuplot(script, out, data_files):
    """Runs gnuplot on `script` (which writes `out`), then removes the data files."""
    try:
        subprocess.run(["gnuplot"], input=script, text=True, check=True)
    finally:
        for path in data_files:
            os.unlink(path)
    print("wrote", out)


def read_runs(doc):
    """(the CSV named on the command line grouped by its model column, the output path): exits
    with `doc` on wrong arguments and with a message on an empty file."""
    if len(sys.argv) not in (2, 3):
        sys.exit(doc)
    src = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) == 3 else os.path.splitext(src)[0] + ".png"
    runs = {}
    with open(src) as f:
        for row in csv.DictReader(f):
            runs.setdefault(row["model"], []).append(row)
    if not runs:
        sys.exit("no rows in " + src)
    return runs, out


def main():
    runs, out = read_runs(__doc__)
    files = []
    for model, rows in runs.items():
        # columns: epoch, seconds, loss, running train accuracy %, recalled % (or NaN)
        lines = []
        for r in rows:
            rec = float(r["recalled"]) * 100 if r["recalled"] else float("nan")
            lines.append("%s %s %s %.3f %.3f" % (r["epoch"], r["seconds"], r["train_loss"],
                                                 float(r["train_accuracy"]) * 100, rec))
        files.append((model, data_file(lines)))
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
    run_gnuplot(script, out, [path for _, path in files])


if __name__ == "__main__":
    main()
