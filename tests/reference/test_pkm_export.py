#!/usr/bin/env python3
"""The PyTorch round trip of python/pkm_export.py: a whole model holding a memory layer at
layers.4.memory is exported with pkm_export.export_memory, (B, T, C) inputs are written with
write_input, pkm_run runs the layer (--prefix), and its outputs and gradients are compared with
autograd's through pkm_export.compare.

Usage: test_pkm_export.py PKM_RUN WORK_DIR   (exit 77, CTest's "skipped", without PyTorch)
"""
import json
import os
import struct
import subprocess
import sys

try:
    import torch
except ImportError:
    print("PyTorch is not installed (Debian: apt-get install python3-torch): skipped", file=sys.stderr)
    sys.exit(77)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "python"))
sys.path.insert(0, HERE)
import pkm_export as pe  # noqa: E402
from make_golden import Memory  # noqa: E402


def main(pkm_run, work):
    os.makedirs(work, exist_ok=True)
    torch.manual_seed(11)
    torch.set_num_threads(1)
    args = dict(input_dim=16, heads=2, n_keys=8, k_dim=8, knn=3, v_dim=12, output_dim=16, gating=True)
    memory = Memory(**args)
    model = torch.nn.Module()  # a whole model: the layer is one part of its state_dict
    model.embed = torch.nn.Linear(16, 16)
    model.layers = torch.nn.ModuleDict({"4": torch.nn.ModuleDict({"memory": memory})})
    with torch.no_grad():
        for name, p in memory.named_parameters():
            if name.endswith(".bias"):
                p.uniform_(-0.5, 0.5)

    B, T, C = 3, 5, 16  # the reference module's (B, T, C) hidden states
    x = torch.randn(B, T, C)
    dy = torch.randn(B, T, args["output_dim"])
    ckpt, inp, out = (os.path.join(work, f) for f in ("model.safetensors", "in.safetensors", "out.safetensors"))
    pe.export_memory(model, ckpt, knn=args["knn"], prefix="layers.4.memory.")
    pe.write_input(inp, x, dy)
    subprocess.run([pkm_run, "--checkpoint", ckpt, "--prefix", "layers.4.memory.", "--input", inp,
                    "--output", out], check=True)

    xf = x.reshape(-1, C).clone().requires_grad_(True)  # (B*T, C): one token per row, as pkm
    y, idx, w = memory(xf)
    (y * dy.reshape(-1, dy.shape[-1])).sum().backward()
    expected = {"y": y.detach(), "indices": idx, "scores": w.detach(), "dx": xf.grad}
    for name, p in memory.named_parameters():
        expected["grad.layers.4.memory." + name] = p.grad  # pkm_run names gradients as the file does
    got, _ = pe.read_safetensors(out)
    report = pe.compare(expected, got)
    y_btc = got["y"].reshape(B, T, -1)  # back to (B, T, C)
    print(f"{report['compared']} tensors, worst relative error {report['worst'][0]:.3g} ({report['worst'][1]}); "
          f"y back to {list(y_btc.shape)}")
    for f in report["failures"]:
        print(f, file=sys.stderr)
    ok = not report["failures"] and report["compared"] == len(expected) and list(y_btc.shape) == [B, T, 16]
    # The command-line comparison agrees.
    pe.write_safetensors(os.path.join(work, "expected.safetensors"), expected)
    cli = subprocess.run([sys.executable, os.path.join(HERE, "..", "..", "python", "pkm_export.py"), "compare",
                          os.path.join(work, "expected.safetensors"), out])
    return 0 if ok and cli.returncode == 0 and hostile_files(work) else 1


def raw_file(path, header, data=b"", length=None):
    h = json.dumps(header).encode() if not isinstance(header, bytes) else header
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h) if length is None else length))
        f.write(h)
        f.write(data)


def hostile_files(work):
    """Files pkm's C++ reader refuses are refused here too (MalformedFile, exit 3 from the
    command line with a message and no traceback); a file of no tensors compares as a failure."""
    ok = True
    good = os.path.join(work, "good.safetensors")
    pe.write_safetensors(good, {"a": torch.ones(2, 2)})
    cases = {
        "negative offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, bytes(16)),
        "reversed offsets": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, bytes(16)),
        "aliasing tensors": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                              "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
        "overlapping tensors": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)),
        "past the end": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)),
        "span unlike the shape": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
        "unknown dtype": ({"a": {"dtype": "Q8", "shape": [1], "data_offsets": [0, 1]}}, bytes(1)),
        "boolean shape": ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, bytes(4)),
        "not JSON": (b"{nope", b""),
        "not an object": ([1, 2], b""),
        "metadata not strings": ({"__metadata__": {"k": 1}}, b""),
    }
    for what, (header, data) in cases.items():
        path = os.path.join(work, "hostile.safetensors")
        raw_file(path, header, data)
        try:
            pe.read_safetensors(path)
            print(f"FAIL {what}: read", file=sys.stderr)
            ok = False
        except pe.MalformedFile as e:
            print(f"ok   {what}: {e}")
        if what not in ("negative offsets", "not JSON"):  # the command line on two (each run imports torch)
            continue
        cli = subprocess.run([sys.executable, os.path.join(HERE, "..", "..", "python", "pkm_export.py"), "compare",
                              good, path], capture_output=True, text=True)
        if cli.returncode != 3 or "Traceback" in cli.stderr or "pkm_export.py:" not in cli.stderr:
            print(f"FAIL {what}: compare exited {cli.returncode}: {cli.stderr}", file=sys.stderr)
            ok = False
    path = os.path.join(work, "truncated.safetensors")
    raw_file(path, {"a": 1}, length=1 << 40)
    try:
        pe.read_safetensors(path)
        ok = False
    except pe.MalformedFile as e:
        print(f"ok   header past the end: {e}")
    empty = os.path.join(work, "empty.safetensors")
    pe.write_safetensors(empty, {})
    cli = subprocess.run([sys.executable, os.path.join(HERE, "..", "..", "python", "pkm_export.py"), "compare",
                          empty, good], capture_output=True, text=True)
    if cli.returncode != 1 or "no tensor was compared" not in cli.stderr:
        print(f"FAIL nothing to compare: exit {cli.returncode}: {cli.stdout} {cli.stderr}", file=sys.stderr)
        ok = False
    missing = subprocess.run([sys.executable, os.path.join(HERE, "..", "..", "python", "pkm_export.py"), "compare",
                              os.path.join(work, "no-such-file"), good], capture_output=True, text=True)
    if missing.returncode != 3 or "Traceback" in missing.stderr:
        print(f"FAIL a missing file: exit {missing.returncode}", file=sys.stderr)
        ok = False
    return ok


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
