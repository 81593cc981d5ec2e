#!/usr/bin/env python3
"""Checks that every C++ sample in README.md and docs/*.md is code that CI builds and runs.

Each ```cpp block must follow a marker line
    <!-- sample: examples/docs/FILE.cpp#NAME -->
and equal, line for line, the region of that file between `// [NAME]` and `// [/NAME]`
(indentation of the region removed). A block without a marker, a marker without a block, a
missing file or region, or any difference fails, naming the document and line.

Usage: check_doc_samples.py REPO_ROOT
"""
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


def main(root):
    root = pathlib.Path(root)
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
    for e in errors:
        print(e)
    print(f"{checked} C++ samples checked, {len(errors)} problems")
    return 1 if errors or checked == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
