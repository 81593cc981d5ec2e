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
    """The reference layer with a sparse table gradient (as nn.Embedding(sparse=True))."""

    def __init__(self):
        super().__init__()
        self.m = make_golden.Memory(**MEM)

    def forward(self, x):
        saved = make_golden.F
        make_golden.F = types.SimpleNamespace(embedding_bag=functools.partial(F.embedding_bag, sparse=True),
                                              softmax=F.softmax, silu=F.silu)
        try:
            shape = x.shape
            return self.m(x.reshape(-1, D))[0].view(shape)
        finally:
            make_golden.F = saved


def pkm_ffn():
    return pkm_torch.HashingMemory(input_dim=D, output_dim=D, mem_n_keys=MEM["n_keys"], mem_heads=MEM["heads"],
                                   mem_knn=MEM["knn"], mem_k_dim=MEM["k_dim"], mem_v_dim=MEM["v_dim"])


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--library", default=None)
    args = ap.parse_args()
    pkm_torch.load_library(args.library)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    x = torch.randn(B, T, D) * 0.5
    tokens = B * T
    rows = []
    for what, make in (("reference", ReferenceFFN), ("pkm_torch", pkm_ffn)):
        torch.manual_seed(1)
        ffn = make()
        for scope, model in (("layer", ffn), ("block", Block(ffn))):
            f, fb = measure(model, x, args.reps)
            rows.append((what, scope, f, fb))
            print("%-9s %-5s forward %7.3f s %7.0f tokens/s   forward+backward %7.3f s %7.0f tokens/s" %
                  (what, scope, f, tokens / f, fb, tokens / fb), flush=True)
    for scope in ("layer", "block"):
        r = next(r for r in rows if r[0] == "reference" and r[1] == scope)
        p = next(r for r in rows if r[0] == "pkm_torch" and r[1] == scope)
        print("pkm_torch / reference, %s: forward %.2fx, forward+backward %.2fx" % (scope, r[2] / p[2], r[3] / p[3]))


if __name__ == "__main__":
    main()
