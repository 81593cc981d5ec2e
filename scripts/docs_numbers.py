#!/usr/bin/env python3
"""Regenerates the numbers the docs quote from a run of the current code, instead of hand edits.

    scripts/docs_numbers.py [--build build]

Runs `build/examples/train_facts` with its default arguments (about 2 minutes on 2 cores; run
it with nothing else on the machine), writes its curves to docs/train_facts.csv, and rewrites
every region of README.md and docs/*.md between

    <!-- numbers: train_facts NAME -->   and   <!-- /numbers -->

with what that run printed (NAME: `readme` or `training`). Exits 1, changing nothing, if the run
fails or a region is missing.
"""
import argparse
import csv
import datetime
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
REGION = re.compile(r"(<!-- numbers: train_facts (\w+) -->\n)(.*?)(<!-- /numbers -->)", re.S)


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, StopIteration):
        return "this CPU"


def parse_table(stdout):
    """The result table train_facts prints: {model: (macs, active, total, pct, count, seconds)}."""
    rows = {}
    for line in stdout.splitlines():
        m = re.match(r"\| (dense|memory) \| (\d+) \| (\d+) \| (\d+) \| ([\d.]+)% \((\d+)\) \| ([\d.]+) s \|", line)
        if m:
            rows[m.group(1)] = (int(m.group(2)), int(m.group(3)), int(m.group(4)), float(m.group(5)),
                                int(m.group(6)), float(m.group(7)))
    if set(rows) != {"dense", "memory"}:
        raise SystemExit("docs_numbers.py: train_facts printed no result table:\n" + stdout[-2000:])
    return rows


def recalls(csv_path):
    """{model: [(epoch, recalled %)]} at the evaluated epochs."""
    out = {}
    with open(csv_path) as f:
        for r in csv.DictReader(f):
            if r["recalled"]:
                out.setdefault(r["model"], []).append((int(r["epoch"]), 100.0 * float(r["recalled"])))
    return out


def regions(rows, curve, when):
    d, m = rows["dense"], rows["memory"]
    ratio = m[4] / d[4]  # from the counts, as train_facts prints it
    per_epoch = (m[5] / d[5])
    readme = (
        "| block | MACs/token | total params | facts recalled | train time |\n"
        "|---|---:|---:|---:|---:|\n"
        f"| dense SwiGLU FFN | {d[0]:,} | {d[2]:,} | {d[3]:.1f} % | {d[5]:.1f} s |\n"
        f"| Memory+ layer | {m[0]:,} | {m[2]:,} | {m[3]:.1f} % | {m[5]:.1f} s |\n\n"
        f"Memory+ recalls {ratio:.1f}× the facts at matched compute, at {per_epoch:.1f}× the wall time "
        f"on this CPU ({when}).\n")
    mem = " / ".join(f"{p:.1f}" for _, p in curve["memory"][1:])
    mem_epochs = " / ".join(str(e) for e, _ in curve["memory"][1:])
    dense = " / ".join(f"{p:.1f}" for _, p in curve["dense"])
    dense_epochs = " / ".join(str(e) for e, _ in curve["dense"])
    training = (
        f"**Results** ({when}, 2 threads, one run of the default command; the training times "
        "exclude the full-pass evaluations):\n\n"
        "| block | MACs/token | active params | total params | facts recalled | train time |\n"
        "|---|---:|---:|---:|---:|---:|\n"
        f"| dense SwiGLU FFN | {d[0]:,} | {d[1]:,} | {d[2]:,} | {d[3]:.1f} % ({d[4]:,}) | {d[5]:.1f} s |\n"
        f"| Memory+ layer | {m[0]:,} | {m[1]:,} | {m[2]:,} | **{m[3]:.1f} % ({m[4]:,})** | {m[5]:.1f} s |\n\n"
        f"**Memory+ recalls {ratio:.1f}× the facts of the dense FFN at matched compute.** The memory model "
        f"recalls {curve['memory'][0][1]:.1f} % after {curve['memory'][0][0]} epochs ({mem} % at epochs "
        f"{mem_epochs}); the dense model {dense} % at epochs {dense_epochs}.\n")
    return {"readme": readme, "training": training}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", default=str(ROOT / "build"))
    args = ap.parse_args()
    program = pathlib.Path(args.build) / "examples" / "train_facts"
    if not program.exists():
        raise SystemExit(f"docs_numbers.py: {program} not found; build it (cmake --build build --target train_facts)")
    csv_path = ROOT / "docs" / "train_facts.csv"
    tmp = csv_path.with_suffix(".csv.new")
    run = subprocess.run([str(program), "--csv", str(tmp)], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"docs_numbers.py: train_facts failed ({run.returncode}):\n{run.stderr[-2000:]}")
    rows = parse_table(run.stdout)
    when = f"{datetime.date.today().isoformat()}, {cpu_name()}, {os.cpu_count()} cores"
    new = regions(rows, recalls(tmp), when)
    docs = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
    edits, seen = {}, set()
    for doc in docs:
        text = doc.read_text()
        def sub(m):
            seen.add(m.group(2))
            if m.group(2) not in new:
                raise SystemExit(f"docs_numbers.py: {doc}: unknown region '{m.group(2)}'")
            return m.group(1) + new[m.group(2)] + m.group(4)
        changed = REGION.sub(sub, text)
        if changed != text:
            edits[doc] = changed
    if seen != set(new):
        raise SystemExit(f"docs_numbers.py: regions {sorted(set(new) - seen)} not found in the docs")
    for doc, text in edits.items():
        doc.write_text(text)
    os.replace(tmp, csv_path)
    print(run.stdout)
    print("updated: " + ", ".join(str(d.relative_to(ROOT)) for d in edits) + ", docs/train_facts.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
