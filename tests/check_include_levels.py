#!/usr/bin/env python3
"""Checks that every include between pkm's headers points down the levels of
docs/architecture.md: helpers < data < ops < composition < layers < training < around.
A header may include headers of its own level or below; an include that points up (an op
including the composition, a helper including an op) fails, naming both.

Usage: check_include_levels.py REPO_ROOT
"""
import pathlib
import re
import sys

LEVELS = [
    ("helpers", ["detail/*", "dtype.hpp", "errors.hpp", "types.hpp", "config.hpp", "version.hpp"]),
    ("data", ["parameters.hpp", "value_table.hpp", "quantized_table.hpp", "sparse_grad.hpp", "page_buffer.hpp", "init.hpp"]),
    ("ops", ["gemm.hpp", "gemm_bf16.hpp", "packed_weights.hpp", "linear.hpp", "qk_norm.hpp", "product_keys.hpp", "softmax.hpp", "key_search.hpp",
             "embedding_bag.hpp", "quantized_bag.hpp", "memory_output.hpp", "value_gradient.hpp", "row_accumulator.hpp",
             "embedding_bag_ref.hpp", "product_keys_ref.hpp", "activations.hpp"]),
    ("composition", ["layer_cache.hpp", "layer_composition.hpp", "layer_api.hpp", "row_fetch.hpp"]),
    ("layers", ["memory_layer.hpp"]),
    ("training", ["optim/*", "row_mask.hpp", "slot_statistics.hpp", "slot_selection.hpp"]),
    ("around", ["io/*", "distributed/*", "distributed.hpp", "torch/*", "cuda/*", "pkm.hpp", "precompiled.hpp"]),
]


def level_of(rel):
    for i, (_, patterns) in enumerate(LEVELS):
        for p in patterns:
            if p.endswith("/*") and rel.startswith(p[:-1]):
                return i
            if rel == p:
                return i
    return None


def main(root):
    base = pathlib.Path(root) / "include" / "pkm"
    errors, edges = [], 0
    for path in sorted(list(base.rglob("*.hpp")) + list(base.rglob("*.cuh"))):
        rel = path.relative_to(base).as_posix()
        mine = level_of(rel)
        if mine is None:
            errors.append(f"pkm/{rel}: in no level of docs/architecture.md")
            continue
        for m in re.finditer(r'#include "pkm/([^"]+)"', path.read_text()):
            target = m.group(1)
            theirs = level_of(target)
            edges += 1
            if theirs is None:
                errors.append(f"pkm/{rel} includes pkm/{target}, which is in no level")
            elif theirs > mine:
                errors.append(f"pkm/{rel} ({LEVELS[mine][0]}) includes pkm/{target} ({LEVELS[theirs][0]}): it points up")
    for e in errors:
        print(e)
    print(f"{edges} includes checked, {len(errors)} problems")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
