#!/usr/bin/env python3
"""pkm inside PyTorch: a small transformer block whose FFN is (a) the pure-PyTorch reference
memory layer (tests/reference/make_golden.py, the reference HashingMemory's computation, its
table gradient sparse) or (b) pkm_torch.HashingMemory (pkm's kernels through torch.ops.pkm),
on the CPU with 2 threads, at the paper-like shape of pkm_bench's BM_LayerForward (d = 1024,
512^2 slots x 1024, 4 heads, knn 32, k_dim 512; 2048 tokens as 4 x 512). Prints tokens/s of
the forward and of forward + backward, for the block and for the memory layer alone.

Usage: /usr/bin/python3 bench/compare_torch_module.py [--reps N] [--library build/python/libpkm_torch_ops.so]
"""
import argparse
import functools
import os
import sys
import types

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))
sys.path.insert(0, os.path.join(ROOT, "python"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import make_golden  # noqa: E402
from compare_pytorch import median_time  # noqa: E402
import pkm_torch  # noqa: E402

D, B, T = 1024, 4, 512
MEM = dict(input_dim=D, heads=4, n_keys=512, k_dim=512, knn=32, v_dim=1024, output_dim=D)


class ReferenceFFN(torch.nn.Module):
    """The reference layer, its table gradient sparse (as nn.Embedding(sparse=True)) or dense."""

    def __init__(self, sparse=True):
        super().__init__()
        self.m = make_golden.Memory(**MEM)
        self.sparse = sparse

    def forward(self, x):
        saved = make_golden.F
        make_golden.F = types.SimpleNamespace(embedding_bag=functools.partial(F.embedding_bag, sparse=self.sparse),
                                              softmax=F.softmax, silu=F.silu)
        try:
            shape = x.shape
            return self.m(x.reshape(-1, D))[0].view(shape)
        finally:
            make_golden.F = saved


def pkm_ffn(sparse=True, fused=None):
    m = pkm_torch.HashingMemory(input_dim=D, output_dim=D, mem_n_keys=MEM["n_keys"], mem_heads=MEM["heads"],
                                mem_knn=MEM["knn"], mem_k_dim=MEM["k_dim"], mem_v_dim=MEM["v_dim"], sparse=sparse)
    if fused is not None:
        m.fused_optimizer("adagrad", lr=1e-3, accumulate=fused == "accumulate")
    return m


class Block(torch.nn.Module):
    def __init__(self, ffn):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(D), torch.nn.LayerNorm(D)
        self.attn = torch.nn.MultiheadAttention(D, 8, batch_first=True)
        self.ffn = ffn

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ffn(self.ln2(x))


def measure(model, x, reps):
    def fwd():
        with torch.no_grad():
            model(x)

    def fwd_bwd():
        for p in model.parameters():
            p.grad = None
        model(x).sum().backward()
    return median_time(fwd, reps), median_time(fwd_bwd, reps)


def accumulation(model, x, micro):
    """Gradient accumulation: `micro` forward + backward passes of x's micro-batches, the table's
    gradient summed over them (by autograd into .grad, or by pkm's accumulating optimizer)."""
    parts = x.chunk(micro)

    def run():
        for p in model.parameters():
            p.grad = None
        if getattr(model, "_fused", None) is not None:
            model._fused.zero_grad()  # the accumulated rows, as .grad = None for the others
        for part in parts:
            model(part).sum().backward()
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--library", default=None)
    ap.add_argument("--part", choices=("all", "layer", "accumulation"), default="all")
    args = ap.parse_args()
    pkm_torch.load_library(args.library)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    x = torch.randn(B, T, D) * 0.5
    tokens = B * T
    if args.part != "accumulation":
        layer_and_block(x, args.reps)
    if args.part != "layer":
        accumulation_part(x, args.reps)


def layer_and_block(x, reps):
    tokens = x.shape[0] * x.shape[1]
    rows = []
    # The table gradient sparse on both sides (what earlier runs compared), then dense on both
    # (what a drop-in user gets from plain optimizers), then pkm's fused update.
    for what, make in (("reference", ReferenceFFN), ("pkm_torch", pkm_ffn),
                       ("reference dense", lambda: ReferenceFFN(sparse=False)),
                       ("pkm_torch dense", lambda: pkm_ffn(sparse=False)),
                       ("pkm_torch fused", lambda: pkm_ffn(fused="adagrad"))):
        torch.manual_seed(1)
        ffn = make()
        scopes = (("layer", ffn), ("block", Block(ffn))) if what in ("reference", "pkm_torch") else (("layer", ffn),)
        for scope, model in scopes:
            f, fb = measure(model, x, reps)
            rows.append((what, scope, f, fb))
            print("%-15s %-5s forward %7.3f s %7.0f tokens/s   forward+backward %7.3f s %7.0f tokens/s" %
                  (what, scope, f, tokens / f, fb, tokens / fb), flush=True)
        del ffn, scopes
    def row(what, scope):
        return next(r for r in rows if r[0] == what and r[1] == scope)
    for ref, mine, scope in (("reference", "pkm_torch", "layer"), ("reference", "pkm_torch", "block"),
                             ("reference dense", "pkm_torch dense", "layer"), ("reference", "pkm_torch fused", "layer")):
        r, p = row(ref, scope), row(mine, scope)
        print("%s / %s, %s: forward %.2fx, forward+backward %.2fx" % (mine, ref, scope, r[2] / p[2], r[3] / p[3]))


def accumulation_part(x, reps):
    """Gradient accumulation over 4 micro-batches of 512 tokens."""
    tokens = x.shape[0] * x.shape[1]
    micro = 4
    acc = []
    for what, make in (("reference dense", lambda: ReferenceFFN(sparse=False)),
                       ("reference sparse", ReferenceFFN),
                       ("pkm_torch sparse", pkm_ffn),
                       ("pkm_torch dense", lambda: pkm_ffn(sparse=False)),
                       ("pkm_torch accumulate", lambda: pkm_ffn(fused="accumulate"))):
        torch.manual_seed(1)
        ffn = make()
        t = median_time(accumulation(ffn, x.reshape(-1, D), micro), reps)
        acc.append((what, t))
        print("accumulating %d micro-batches, %-20s %7.3f s %7.0f tokens/s" % (micro, what, t, tokens / t), flush=True)
        if what == "pkm_torch accumulate":
            step = median_time(lambda: (accumulation(ffn, x.reshape(-1, D), micro)(), ffn._fused.step()), reps) - t
            print("  + pkm's Adagrad step of the accumulated rows: %.3f s" % step)
        del ffn
    base = acc[0][1]
    for what, t in acc[1:]:
        print("accumulation, %s / reference dense: %.2fx" % (what, base / t))


if __name__ == "__main__":
    main()
