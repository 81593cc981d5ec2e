#!/usr/bin/env python3
"""Writes the golden files of pkm's PyTorch parity tests into tests/data/.

For each case: <case>.checkpoint.safetensors (a memory layer with the parameter names of the
reference `HashingMemory`, and __metadata__ mem_knn / qk_norm / qk_norm_scale),
<case>.input.safetensors (x, dy) and <case>.expected.safetensors (y, indices, scores, dx and
grad.<name> for every checkpoint tensor, from autograd).

Needs PyTorch (Debian: apt-get install python3-torch); the C++ tests do not.
Run from the repository root:  /usr/bin/python3 tests/reference/make_golden.py
It also writes adamw.safetensors, torch.optim.AdamW's trajectory for the optimizer tests
(alone: --optimizer-only).
The other way round, that PyTorch reads what pkm writes:
  /usr/bin/python3 tests/reference/make_golden.py --check-pkm-file CKPT IN OUT
loads CKPT (written by pkm::io::save_layer) into the module with strict names and shapes, runs
it on IN and compares with OUT, pkm_run's output for the same files.
The module below is written from the formulas in docs/architecture.md, not taken from the
reference code; it computes the same function.
"""
import json
import math
import os
import struct
import sys

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    print("PyTorch is not installed (Debian: apt-get install python3-torch): skipped", file=sys.stderr)
    sys.exit(77)  # CTest's "skipped"

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data")

# The safetensors reader and writer pkm ships for PyTorch users (python/pkm_export.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
from pkm_export import read_safetensors, write_safetensors  # noqa: E402


class QueryProj(torch.nn.Module):
    def __init__(self, input_dim, out_dim, bias):
        super().__init__()
        self.query_mlps = torch.nn.Sequential(torch.nn.Linear(input_dim, out_dim, bias=bias))

    def forward(self, x):
        return self.query_mlps(x)


class Memory(torch.nn.Module):
    """One product-key memory layer, parameter names as the reference module."""

    def __init__(self, input_dim, heads, n_keys, k_dim, knn, v_dim, output_dim,
                 memory_plus=True, value_projection=True, gating=False, query_bias=True,
                 qk_norm=False, qk_norm_scale=None):
        super().__init__()
        self.heads, self.n_keys, self.k_dim, self.knn = heads, n_keys, k_dim, knn
        self.half = k_dim // 2
        self.memory_plus, self.value_projection, self.gating = memory_plus, value_projection, gating
        self.qk_norm = qk_norm
        self.tau = qk_norm_scale if qk_norm_scale is not None else math.sqrt(self.half)
        bound = 1 / math.sqrt(k_dim)
        self.keys = torch.nn.Parameter(torch.empty(2 * heads * n_keys, self.half).uniform_(-bound, bound))
        self.values = torch.nn.Embedding(n_keys * n_keys, v_dim)
        torch.nn.init.normal_(self.values.weight, std=v_dim ** -0.5)
        self.query_proj = QueryProj(input_dim, heads * k_dim, query_bias)
        if memory_plus:
            self.swilu_projection = torch.nn.Linear(input_dim, v_dim)
        if value_projection:
            self.value_proj = torch.nn.Linear(v_dim, output_dim)
        if gating:
            self.gating = torch.nn.Linear(input_dim, 1)

    def forward(self, x):
        B, H, n, k, half = x.shape[0], self.heads, self.n_keys, self.knn, self.half
        q = self.query_proj(x).view(B, H, 2, half)
        K = self.keys.view(H, 2, n, half)
        if self.qk_norm:
            q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
            K = K / torch.sqrt((K * K).sum(-1, keepdim=True) + 1e-6)
        s = torch.einsum("bhtd,htnd->bhtn", q, K)  # half scores (B, H, 2, n)
        if self.qk_norm:
            s = self.tau * s
        s1, i1 = s[:, :, 0].topk(k, dim=-1)
        s2, i2 = s[:, :, 1].topk(k, dim=-1)
        cand = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).view(B, H, k * k)
        scores, best = cand.topk(k, dim=-1)
        idx = i1.gather(-1, best // k) * n + i2.gather(-1, best % k)  # (B, H, k)
        w = F.softmax(scores.float(), dim=-1)
        y = F.embedding_bag(idx.view(B, H * k), self.values.weight, mode="sum",
                            per_sample_weights=w.view(B, H * k))
        if self.memory_plus:
            out = self.value_proj(y * F.silu(self.swilu_projection(x)))
        elif self.value_projection:
            out = self.value_proj(y)
        else:
            out = y
        if self.gating:
            out = torch.sigmoid(self.gating(x)) * out
        return out, idx, w


CASES = {
    # name: (constructor arguments, batch, values stored as BF16)
    "memplus": (dict(input_dim=16, heads=4, n_keys=8, k_dim=8, knn=4, v_dim=12, output_dim=16), 10, False),
    "plain": (dict(input_dim=12, heads=2, n_keys=7, k_dim=6, knn=3, v_dim=10, output_dim=9,
                   memory_plus=False), 9, False),
    "noproj": (dict(input_dim=12, heads=2, n_keys=6, k_dim=4, knn=3, v_dim=8, output_dim=8,
                    memory_plus=False, value_projection=False), 8, False),
    "gated": (dict(input_dim=16, heads=4, n_keys=8, k_dim=8, knn=4, v_dim=12, output_dim=16,
                   gating=True), 10, False),
    "noqbias": (dict(input_dim=10, heads=2, n_keys=9, k_dim=8, knn=5, v_dim=6, output_dim=10,
                     query_bias=False), 7, False),
    "qknorm": (dict(input_dim=16, heads=4, n_keys=8, k_dim=8, knn=4, v_dim=12, output_dim=16,
                    qk_norm=True), 10, False),
    "qknorm_scale": (dict(input_dim=16, heads=2, n_keys=8, k_dim=8, knn=4, v_dim=12, output_dim=16,
                          qk_norm=True, qk_norm_scale=2.5, gating=True), 10, False),
    "heads1_knn1": (dict(input_dim=8, heads=1, n_keys=10, k_dim=6, knn=1, v_dim=8, output_dim=8), 12, False),
    "knn_all": (dict(input_dim=12, heads=4, n_keys=6, k_dim=8, knn=6, v_dim=10, output_dim=12), 8, False),
    "bf16_values": (dict(input_dim=16, heads=4, n_keys=8, k_dim=8, knn=4, v_dim=16, output_dim=16), 10, True),
}


def random_cases(count, seed=77):
    """Configurations drawn at random (sizes and switches), for parity beyond the named cases."""
    import random
    rng = random.Random(seed)
    cases = {}
    for i in range(count):
        n_keys = rng.randint(3, 12)
        plus = rng.random() < 0.5
        proj = plus or rng.random() < 0.6
        v_dim = rng.randint(2, 20)
        args = dict(input_dim=rng.randint(2, 24), heads=rng.randint(1, 4), n_keys=n_keys,
                    k_dim=2 * rng.randint(1, 6), knn=rng.randint(1, n_keys), v_dim=v_dim,
                    output_dim=rng.randint(2, 20) if proj else v_dim, memory_plus=plus,
                    value_projection=proj, gating=rng.random() < 0.4,
                    query_bias=rng.random() < 0.7, qk_norm=rng.random() < 0.4)
        if args["qk_norm"] and args["k_dim"] == 2:
            # Halves of width 1 normalise to +-1: every score is +-tau and the selection is
            # decided by ties, which PyTorch and pkm may break differently.
            args["k_dim"] = 4
        if args["qk_norm"] and rng.random() < 0.5:
            args["qk_norm_scale"] = round(rng.uniform(0.5, 4.0), 3)
        cases["random_%d" % i] = (args, rng.randint(1, 16), False)
    return cases


CASES.update(random_cases(6))


def check_pkm_file(ckpt_path, input_path, pkm_output_path):
    """Loads a checkpoint written by pkm into the PyTorch module (strict names and shapes),
    runs it on the input and compares with pkm_run's output for it."""
    tensors, meta = read_safetensors(ckpt_path)
    v_rows, v_dim = tensors["values.weight"].shape
    n = int(round(math.sqrt(v_rows)))
    half = tensors["keys"].shape[1]
    args = dict(input_dim=tensors["query_proj.query_mlps.0.weight"].shape[1],
                heads=tensors["keys"].shape[0] // (2 * n), n_keys=n, k_dim=2 * half,
                knn=int(meta["mem_knn"]), v_dim=v_dim,
                output_dim=tensors["value_proj.weight"].shape[0] if "value_proj.weight" in tensors else v_dim,
                memory_plus="swilu_projection.weight" in tensors,
                value_projection="value_proj.weight" in tensors, gating="gating.weight" in tensors,
                query_bias="query_proj.query_mlps.0.bias" in tensors,
                qk_norm=meta.get("qk_norm") == "true",
                qk_norm_scale=float(meta["qk_norm_scale"]) if "qk_norm_scale" in meta else None)
    m = Memory(**args)
    m.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    inp, _ = read_safetensors(input_path)
    x = inp["x"].float().clone().requires_grad_(True)
    y, idx, w = m(x)
    got, _ = read_safetensors(pkm_output_path)
    worst = max((y - got["y"]).abs().max().item() / y.abs().max().item(),
                (w - got["scores"]).abs().max().item())
    same = bool((idx == got["indices"]).all())
    print("PyTorch loaded the pkm file (strict); indices equal: %s; worst relative error %.3g" % (same, worst))
    return 0 if same and worst < 1e-5 else 1


def make_case(name, args, batch, bf16_values, seed):
    torch.manual_seed(seed)
    m = Memory(**args)
    with torch.no_grad():  # non-zero biases, so that every gradient is exercised
        for pname, p in m.named_parameters():
            if pname.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
        if bf16_values:  # the table as the reference stores it; computed in fp32
            m.values.weight.copy_(m.values.weight.to(torch.bfloat16).float())
    x = torch.randn(batch, args["input_dim"], requires_grad=True)
    y, idx, w = m(x)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()

    params = dict(m.named_parameters())
    ckpt = {k: v.detach() for k, v in params.items()}
    if bf16_values:
        ckpt["values.weight"] = ckpt["values.weight"].to(torch.bfloat16)
    meta = {"mem_knn": args["knn"], "qk_norm": "true" if args.get("qk_norm") else "false"}
    if args.get("qk_norm_scale") is not None:
        meta["qk_norm_scale"] = repr(float(args["qk_norm_scale"]))
    write_safetensors(os.path.join(OUT, name + ".checkpoint.safetensors"), ckpt, meta)
    write_safetensors(os.path.join(OUT, name + ".input.safetensors"), {"x": x.detach(), "dy": dy})
    expected = {"y": y.detach(), "indices": idx, "scores": w.detach(), "dx": x.grad}
    for k, v in params.items():
        expected["grad." + k] = v.grad
    write_safetensors(os.path.join(OUT, name + ".expected.safetensors"), expected,
                      {"torch": torch.__version__})


def make_optimizer_case():
    """adamw.safetensors: torch.optim.AdamW with clip_grad_norm_ over 4 steps, in float64.
    w0, grad.<t> and expected.<t> (the parameters after step t), hyper-parameters in metadata."""
    torch.manual_seed(5)
    w = torch.randn(6, 5, dtype=torch.float64)
    hp = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.1, "max_grad_norm": 0.5}
    p = torch.nn.Parameter(w.clone())
    opt = torch.optim.AdamW([p], lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                            weight_decay=hp["weight_decay"])
    out = {"w0": w}
    for t in range(1, 5):
        g = 2.0 * torch.randn(6, 5, dtype=torch.float64)
        out["grad.%d" % t] = g
        p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_([p], hp["max_grad_norm"])
        opt.step()
        out["expected.%d" % t] = p.detach().clone()
    write_safetensors(os.path.join(OUT, "adamw.safetensors"), out,
                      dict(hp, torch=torch.__version__))


def main():
    os.makedirs(OUT, exist_ok=True)
    make_optimizer_case()
    torch.set_num_threads(1)
    for seed, (name, (args, batch, bf16)) in enumerate(sorted(CASES.items())):
        make_case(name, args, batch, bf16, 1000 + seed)
        print("wrote", name, file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--check-pkm-file":
        sys.exit(check_pkm_file(*sys.argv[2:]))
    if len(sys.argv) == 2 and sys.argv[1] == "--optimizer-only":
        os.makedirs(OUT, exist_ok=True)
        make_optimizer_case()
        sys.exit(0)
    main()
