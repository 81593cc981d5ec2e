#!/usr/bin/env python3
"""Checks that every C++ sample in README.md and docs/*.md is code that CI builds and runs.

Each ```cpp block must follow a marker line
    <!-- sample: examples/docs/FILE.cpp#NAME -->
and equal, line for line, the region of that file between `// [NAME]` and `// [/NAME]`
(indentation of the region removed). A block without a marker, a marker without a block, a
missing file or region, or any difference fails, naming the document and line.

A CUDA sample (a .cu file) must also have been compiled by this build where nvcc is present:
CMake passes `--compiled FILE=BINARY` for each CUDA sample it builds, and the check fails if
nvcc is installed but a .cu sample was not built, or its binary is older than the source
(--no-cuda-build: the build leaves CUDA or the samples out on purpose).

Usage: check_doc_samples.py REPO_ROOT [--compiled FILE=BINARY ...] [--no-cuda-build] [--fix]
(--fix first rewrites the docs' samples from their regions, e.g. after a reformat.)
"""
import os
import shutil
import pathlib
import re
import sys
import textwrap

MARKER = re.compile(r"<!--\s*sample:\s*(\S+?)#(\S+)\s*-->")


def region(path, name):
    lines = path.read_text().splitlines()
    try:
        begin = next(i for i, l in enumerate(lines) if l.strip() == f"// [{name}]")
        end = next(i for i, l in enumerate(lines) if l.strip() == f"// [/{name}]")
    except StopIteration:
        return None
    return textwrap.dedent("\n".join(lines[begin + 1:end])).splitlines()


def find_nvcc():
    return shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


def fix(root):
    """Rewrites every marked sample block of the docs from its region (after a reformat)."""
    root = pathlib.Path(root)
    for doc in [root / "README.md"] + sorted((root / "docs").glob("*.md")):
        lines = doc.read_text().splitlines()
        out, i, pending, changed = [], 0, None, False
        while i < len(lines):
            m = MARKER.search(lines[i])
            out.append(lines[i])
            if m:
                pending = (m.group(1), m.group(2))
            elif lines[i].strip() in ("```cpp", "```c++") and pending is not None:
                j = i + 1
                while j < len(lines) and lines[j].strip() != "```":
                    j += 1
                want = region(root / pending[0], pending[1])
                if want is not None and want != lines[i + 1:j]:
                    out.extend(want)
                    changed = True
                else:
                    out.extend(lines[i + 1:j])
                out.append(lines[j])
                pending = None
                i = j
            elif lines[i].strip().startswith("```"):
                pending = None
            i += 1
        if changed:
            doc.write_text("\n".join(out) + "\n")
            print(f"rewrote the samples of {doc.relative_to(root)}")


def main(root, compiled, cuda_build=True):
    root = pathlib.Path(root)
    cuda_samples = set()
    docs = [root / "README.md"] + sorted((root / "docs").glob("*.md"))
    errors, checked = [], 0
    for doc in docs:
        lines = doc.read_text().splitlines()
        pending = None
        i = 0
        while i < len(lines):
            m = MARKER.search(lines[i])
            if m:
                pending = (m.group(1), m.group(2), i + 1)
            elif lines[i].strip().startswith("```"):
                fence = lines[i].strip()
                j = i + 1
                while j < len(lines) and lines[j].strip() != "```":
                    j += 1
                if fence in ("```cpp", "```c++"):
                    where = f"{doc.relative_to(root)}:{i + 1}"
                    if pending is None:
                        errors.append(f"{where}: a C++ sample without a <!-- sample: FILE#NAME --> marker")
                    else:
                        file, name, _ = pending
                        if file.endswith(".cu"):
                            cuda_samples.add(file)
                        want = region(root / file, name) if (root / file).exists() else None
                        got = lines[i + 1:j]
                        if want is None:
                            errors.append(f"{where}: no region '{name}' in {file}")
                        elif got != want:
                            diff = next((k for k in range(max(len(got), len(want)))
                                         if k >= len(got) or k >= len(want) or got[k] != want[k]), 0)
                            errors.append(f"{where}: differs from {file}#{name} at sample line {diff + 1}:\n"
                                          f"    doc:  {got[diff] if diff < len(got) else '<end>'}\n"
                                          f"    file: {want[diff] if diff < len(want) else '<end>'}")
                        checked += 1
                elif pending is not None:
                    errors.append(f"{doc.relative_to(root)}:{pending[2]}: marker not followed by a ```cpp block")
                pending = None
                i = j
            i += 1
        if pending is not None:
            errors.append(f"{doc.relative_to(root)}:{pending[2]}: marker not followed by a ```cpp block")
    nvcc = find_nvcc()
    for file in sorted(cuda_samples):
        if nvcc is None or not cuda_build:
            print(f"{file}: a CUDA sample, not compiled by this build ({'no nvcc' if nvcc is None else 'CUDA or the samples off'})")
            continue
        binary = compiled.get(file)
        if binary is None:
            errors.append(f"{file}: a CUDA sample, and nvcc is at {nvcc}, but the build did not compile it "
                          "(configure with PKM_CUDA=ON and PKM_BUILD_DOC_SAMPLES=ON)")
        elif not os.path.exists(binary) or os.path.getmtime(binary) < os.path.getmtime(root / file):
            errors.append(f"{file}: its build {binary} is missing or older than the source")
        else:
            print(f"{file}: compiled with nvcc ({binary})")
    for e in errors:
        print(e)
    print(f"{checked} C++ samples checked, {len(errors)} problems")
    return 1 if errors or checked == 0 else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    root = args[0] if args and not args[0].startswith("--") else "."
    if "--fix" in args:
        fix(root)
    built = {}
    for i, a in enumerate(args):
        if a == "--compiled" and i + 1 < len(args):
            f, _, b = args[i + 1].partition("=")
            built[f] = b
    sys.exit(main(root, built, "--no-cuda-build" not in args))
