#!/usr/bin/env python3
"""pkm_export: move a PyTorch memory layer to pkm and compare what comes back.

A dependency-free (PyTorch only; no `safetensors` package needed) companion to pkm's C++ side:

    import pkm_export as pe
    # a trained module with the reference names (HashingMemory, or any module whose state_dict
    # has keys, values.weight, query_proj.query_mlps.0.weight, ...), or a whole model:
    pe.export_memory(model, "memory.safetensors", knn=32, prefix="layers.4.memory.")
    pe.write_input("in.safetensors", x, dy)      # x: (B, T, C) or (N, C); flattened to (N, C)
    # $ pkm_run --checkpoint memory.safetensors --prefix layers.4.memory. \\
    #           --input in.safetensors --output out.safetensors
    out, _ = pe.read_safetensors("out.safetensors")
    y = out["y"].reshape(B, T, -1)               # back to the reference module's (B, T, C)
    report = pe.compare(expected, out)           # expected: the same names from PyTorch

`python3 pkm_export.py compare EXPECTED.safetensors ACTUAL.safetensors` prints the same report
as pkm's golden_compare. Relative error of a tensor = max |actual - expected| / max |expected|.
Exit codes: 0 match, 1 mismatch (or nothing to compare), 2 usage, 3 a malformed file.
"""
import json
import os
import struct
import sys

import torch

DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16",
          torch.float16: "F16", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8"}
FROM_NAME = {v: k for k, v in DTYPES.items()}

# The metadata keys pkm reads (pkm/io/checkpoint.hpp): what tensor shapes cannot say.
META_KNN, META_QK_NORM, META_QK_NORM_SCALE = "mem_knn", "qk_norm", "qk_norm_scale"
META_SCORE_ACTIVATION = "score_activation"
# A quantized table (pkm_torch.QuantizedHashingMemory, docs/quantization.md): values.weight holds
# uint8 rows; these keys (after the layer's prefix) give its format and v_dim.
META_VALUES_FORMAT, META_VALUES_DIM = "pkm_values_format", "pkm_values_dim"


def write_safetensors(path, tensors, metadata=None):
    """Writes {name: tensor} as safetensors (names sorted, header padded to 8 bytes), through a
    temporary file renamed over `path`, as pkm's own writer does."""
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        if t.dtype not in DTYPES:
            raise ValueError(f"tensor '{name}' has dtype {t.dtype}; pkm reads {sorted(DTYPES.values())}")
        raw = t.view(torch.int16).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MalformedFile(ValueError):
    """A file that is not a well-formed safetensors file, by the rules of pkm's C++ reader
    (pkm/io/safetensors.hpp): the message names the file and what is wrong."""


MAX_HEADER_BYTES = 100 << 20  # the C++ reader's limit
ITEMSIZE = {"F32": 4, "F64": 8, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "U8": 1}


def _is_count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_safetensors(path):
    """Returns ({name: tensor}, metadata) of a safetensors file (F32, F64, BF16, F16, I64, I32, U8).
    Raises MalformedFile for what pkm's C++ reader refuses: a header that is not a JSON object
    or runs past the file, an unknown dtype, a shape that is not a list of counts, data_offsets
    that are not [begin, end] inside the data section, that span other than the shape needs, or
    that overlap another tensor's."""
    with open(path, "rb") as f:
        raw = f.read()
    def bad(what):
        raise MalformedFile(f"{path}: {what}")
    if len(raw) < 8:
        bad(f"truncated: {len(raw)} bytes, the header length alone needs 8")
    n = struct.unpack("<Q", raw[:8])[0]
    if n > MAX_HEADER_BYTES:
        bad(f"header length {n} is over the limit of {MAX_HEADER_BYTES} bytes")
    if n > len(raw) - 8:
        bad(f"header length {n} runs past the end of the file ({len(raw)} bytes)")
    try:
        header = json.loads(raw[8:8 + n])
    except (ValueError, RecursionError) as e:
        bad(f"header is not valid JSON: {e}")
    if not isinstance(header, dict):
        bad("header is not a JSON object")
    data = memoryview(raw)[8 + n:]
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        bad("__metadata__ is not an object of strings")
    out, spans = {}, []
    for name, e in header.items():
        if not isinstance(e, dict):
            bad(f"tensor '{name}': entry is not an object")
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if dtype not in ITEMSIZE:
            bad(f"tensor '{name}': unknown dtype {dtype!r}; expected F32, F64, BF16, F16, I64, I32 or U8")
        if not isinstance(shape, list) or len(shape) > 64 or not all(_is_count(d) for d in shape):
            bad(f"tensor '{name}': shape {shape!r} is not a list of at most 64 non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            bad(f"tensor '{name}': data_offsets must be [begin, end] of non-negative integers")
        begin, end = offsets
        if begin > end or end > len(data):
            bad(f"tensor '{name}': data_offsets [{begin}, {end}] are outside the data section of {len(data)} bytes")
        numel = 1
        for d in shape:
            numel *= d
        if numel * ITEMSIZE[dtype] != end - begin:
            bad(f"tensor '{name}': shape {shape} of {dtype} needs {numel * ITEMSIZE[dtype]} bytes, "
                f"but data_offsets span {end - begin}")
        spans.append((begin, end, name))
        buf = bytearray(data[begin:end])
        if dtype == "BF16":
            t = torch.frombuffer(buf, dtype=torch.int16).view(torch.bfloat16) if buf else torch.empty(0, dtype=torch.bfloat16)
        else:
            t = torch.frombuffer(buf, dtype=FROM_NAME[dtype]) if buf else torch.empty(0, dtype=FROM_NAME[dtype])
        out[name] = t.reshape(shape)
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            bad(f"tensors '{n0}' and '{n1}' share bytes (data_offsets [{b0}, {e0}] and [{b1}, {e1}])")
    return out, meta


def export_memory(module_or_state_dict, path, knn, qk_norm=False, qk_norm_scale=None, prefix="",
                  extra_metadata=None, score_activation="softmax"):
    """Writes a memory layer for pkm: every tensor of the state_dict (a whole model's too: pkm
    then loads the layer under `prefix`, LoadOptions::prefix / pkm_run --prefix) and the
    metadata pkm needs (knn, qk-norm and its scale, a score activation other than softmax; for
    a pkm_torch.QuantizedHashingMemory, its table's format and v_dim). Checks that the layer's
    tensors are there."""
    if score_activation not in ("softmax", "relu"):
        raise ValueError(f"score_activation = {score_activation!r}, expected 'softmax' or 'relu'")
    sd = module_or_state_dict.state_dict() if hasattr(module_or_state_dict, "state_dict") else module_or_state_dict
    for required in ("keys", "values.weight", "query_proj.query_mlps.0.weight"):
        if prefix + required not in sd:
            raise KeyError(f"'{prefix + required}' is not in the state_dict: is the prefix '{prefix}' right?")
    meta = {META_KNN: int(knn), META_QK_NORM: "true" if qk_norm else "false"}
    if qk_norm_scale is not None:
        meta[META_QK_NORM_SCALE] = repr(float(qk_norm_scale))
    if score_activation != "softmax":
        meta[META_SCORE_ACTIVATION] = score_activation
    extra = sd.get(prefix + "_extra_state")  # a QuantizedHashingMemory's format and v_dim
    if isinstance(extra, dict) and "format" in extra:
        meta[prefix + META_VALUES_FORMAT] = extra["format"]
        meta[prefix + META_VALUES_DIM] = str(int(extra["v_dim"]))
    meta.update(extra_metadata or {})
    # pkm_torch's fused optimizer state (prefix + "fused_optimizer.*") is training state, not the
    # layer: it stays out of the exported layer.
    write_safetensors(path, {k: v for k, v in sd.items() if torch.is_tensor(v) and ".fused_optimizer." not in "." + k},
                      meta)


def write_input(path, x, dy=None):
    """Writes pkm_run's input: x as (N, C) float32 rows — the reference module's (B, T, C)
    hidden states flattened to N = B*T tokens — and optionally dy of the output's shape."""
    tensors = {"x": x.detach().float().reshape(-1, x.shape[-1])}
    if dy is not None:
        tensors["dy"] = dy.detach().float().reshape(-1, dy.shape[-1])
    write_safetensors(path, tensors)


def compare(expected, actual, rtol=1e-5):
    """Compares tensors of the same names, as pkm's tests do: floats by relative error, integer
    tensors (indices) exactly. Returns {"worst": (error, name), "failures": [...], "compared": n}."""
    worst, failures, compared = (0.0, ""), [], 0
    for name, e in sorted(expected.items()):
        if name not in actual:
            failures.append(f"'{name}' is missing")
            continue
        a = actual[name]
        if tuple(a.shape) != tuple(e.shape):
            failures.append(f"'{name}' has shape {list(a.shape)}, expected {list(e.shape)}")
            continue
        compared += 1
        if e.dtype.is_floating_point:
            e64, a64 = e.double(), a.double()
            scale = e64.abs().max().item() if e64.numel() else 0.0
            err = (e64 - a64).abs().max().item() if e64.numel() else 0.0
            rel = err / scale if scale > 0 else err
            if rel > worst[0]:
                worst = (rel, name)
            if not rel <= rtol:
                failures.append(f"'{name}': max relative error {rel:.3g} > {rtol:g}")
        elif not torch.equal(e.long(), a.long()):
            failures.append(f"'{name}': {int((e.long() != a.long()).sum())} elements differ")
    if compared == 0 and not failures:
        failures.append("no tensor was compared (the expected file holds none)")
    return {"worst": worst, "failures": failures, "compared": compared}


EXIT_MATCH, EXIT_MISMATCH, EXIT_USAGE, EXIT_MALFORMED = 0, 1, 2, 3


def main(argv):
    """Exit codes: 0 the files match, 1 they differ, 2 a usage error, 3 a file is malformed or
    unreadable (its own message, no traceback)."""
    if len(argv) != 4 or argv[1] != "compare":
        print(__doc__.strip().splitlines()[0])
        print("usage: pkm_export.py compare EXPECTED.safetensors ACTUAL.safetensors")
        return EXIT_USAGE
    try:
        expected, _ = read_safetensors(argv[2])
        actual, _ = read_safetensors(argv[3])
    except (MalformedFile, OSError) as e:
        print(f"pkm_export.py: {e}", file=sys.stderr)
        return EXIT_MALFORMED
    r = compare(expected, actual)
    for f in r["failures"]:
        print(f, file=sys.stderr)
    print(f"{r['compared']} tensors compared, worst relative error {r['worst'][0]:.3g} ({r['worst'][1]}): "
          f"{'match' if not r['failures'] else 'MISMATCH'}")
    return EXIT_MATCH if not r["failures"] else EXIT_MISMATCH


if __name__ == "__main__":
    sys.exit(main(sys.argv))
