#!/usr/bin/env python3
"""Plots gcide_lm curves: validation bits per byte against training seconds and against bytes
seen, one line per model.

  /usr/bin/python3 examples/gcide_lm.py --csv gcide_lm.csv
  python3 examples/plot_gcide_lm.py gcide_lm.csv docs/gcide_lm.png

The CSV has model,seconds,steps,tokens,val_bpb. Needs gnuplot (Debian: gnuplot-nox).
"""
from plot_training import data_file, read_runs, run_gnuplot


def main():
    runs, out = read_runs(__doc__)
    files = [(m, data_file(["%s %.4f %s" % (r["seconds"], float(r["tokens"]) / 1e6, r["val_bpb"]) for r in rows]))
             for m, rows in runs.items()]
    colors = ["#d95f02", "#1b9e77", "#7570b3", "#e7298a", "#66a61e", "#e6ab02"]

    def plot(col):
        return ", \\\n     ".join("'%s' using %d:3 with linespoints pt 7 ps 0.6 lw 2 lc rgb '%s' title '%s'"
                                  % (path, col, colors[i % len(colors)], m) for i, (m, path) in enumerate(files))

    script = """
set terminal pngcairo size 1100,440 font 'Sans,11'
set output '%s'
set multiplot layout 1,2 title 'gcide\\_lm: byte-level LM on GCIDE, middle FFN dense vs Memory+ at equal MACs'
set ylabel 'validation bits per byte'
set yrange [*:4]  # the first evaluation (untrained, 8 bits) off the top
set grid
set key right top box opaque
set xlabel 'training seconds (2 cores)'
plot %s
set xlabel 'bytes seen (millions)'
plot %s
unset multiplot
""" % (out, plot(1), plot(2))
    run_gnuplot(script, out, [path for _, path in files])


if __name__ == "__main__":
    main()
