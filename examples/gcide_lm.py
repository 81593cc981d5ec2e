#!/usr/bin/env python3
"""A small byte-level language model on real English: GCIDE's definitions (Debian's dict-gcide,
installed by scripts/install-deps.sh --data), a dense FFN against pkm's Memory+ layer in the
middle block at equal multiply-adds per token and equal wall-clock.

    /usr/bin/python3 examples/gcide_lm.py [--minutes 6] [--csv gcide_lm.csv] [--variants]

The model: bytes embedded (256 x d) plus learned positions, L pre-norm transformer blocks
(causal attention, a SwiGLU FFN), a read-out over the 256 bytes. In the "memory" model the
middle block's FFN is a pkm_torch.HashingMemory (Memory+: product keys, a SiLU gate); in the
"dense" model it is a SwiGLU FFN whose hidden width gives the same multiply-adds per token
(pkm's count: query, half scores, weighted read, gate and output projections). Each model trains
for the same number of minutes (AdamW on the dense parameters; the memory's value table with
pkm's fused lazy Adam), and reports validation bits per byte (bpb) over time. The split is by
headword (a fixed hash: about 5 % of headwords, every entry under them, are validation). The
knowledge probe: the loss, in bits per byte, of each sampled definition given its headword
(the entry's text after the headword), on held-in (trained) and held-out entries.

--variants also trains, for --variant-minutes each, the variants the literature says matter:
no Memory+ gate (the plain product-key memory), qk-norm (keys and queries normalised before
the scores), and Csordas et al.'s ReLU over the selected scores instead of the softmax
(score_activation="relu"), alone and with qk-norm; then the Memory+ and dense models for the
same short budget. --model none trains the variants only.
"""
import argparse
import csv
import math
import os
import random
import re
import sys
import time
import zlib

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "python"))
import dictd  # noqa: E402


# ---- data -------------------------------------------------------------------------------------

_CITATION = re.compile(rb"^\s*\[[^\]\n]*\]\s*$", re.M)  # "[1913 Webster]" and the like
_SPACE = re.compile(rb"\s+")


def clean(entry):
    """An entry's bytes without citation-only lines, whitespace runs made one space."""
    return _SPACE.sub(b" ", _CITATION.sub(b"", entry)).strip()


def is_validation(headword, every):
    return zlib.crc32(headword.lower().encode("utf-8")) % every == 0


def load(path, val_every):
    """(train docs, validation docs): each doc (headword, bytes); every distinct entry once, on
    the side of the first headword that names it."""
    d = dictd.Dictionary(path)
    seen = set()
    train, val = [], []
    for i, (head, offset, length) in enumerate(d.index):
        if head.startswith("00-database") or head.startswith("00database") or (offset, length) in seen:
            continue
        seen.add((offset, length))
        text = clean(d.entry(i))
        if len(text) < 8:
            continue
        (val if is_validation(head, val_every) else train).append((head, text))
    if not train or not val:
        raise ValueError("%s: %d training and %d validation entries; both sides need some (--val-every)" %
                         (path, len(train), len(val)))
    return d, train, val


class Stream:
    """The docs joined by newlines, as a byte tensor; random windows of ctx + 1 bytes."""

    def __init__(self, docs):
        self.data = torch.frombuffer(bytearray(b"\n".join(t for _, t in docs)), dtype=torch.uint8).long()

    def batch(self, rng, batch, ctx):
        if len(self.data) < ctx + 2:
            raise ValueError("%d bytes of text: too few for windows of %d" % (len(self.data), ctx + 1))
        starts = torch.tensor([rng.randrange(len(self.data) - ctx - 1) for _ in range(batch)])
        idx = starts[:, None] + torch.arange(ctx + 1)[None, :]
        w = self.data[idx]
        return w[:, :-1], w[:, 1:]


# ---- the model ----------------------------------------------------------------------------------

class SwiGLU(torch.nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.w1 = torch.nn.Linear(d, hidden, bias=False)
        self.w3 = torch.nn.Linear(d, hidden, bias=False)
        self.w2 = torch.nn.Linear(hidden, d, bias=False)
        self.hidden = hidden

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def macs(self, d):
        return 3 * d * self.hidden


def memory_macs(d, n_keys, heads, knn, k_dim, v_dim):
    """pkm's count (examples/facts_model.hpp memory_macs_per_token), Memory+."""
    return d * heads * k_dim + heads * n_keys * k_dim + heads * knn * v_dim + d * v_dim + v_dim * d


class Block(torch.nn.Module):
    def __init__(self, d, heads, ffn):
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
        self.proj = torch.nn.Linear(d, d, bias=False)
        self.ln2 = torch.nn.LayerNorm(d)
        self.ffn = ffn
        self.heads = heads

    def forward(self, x, mask):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(C // self.heads)
        att = att.masked_fill(mask[:T, :T], float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, T, C))
        return x + self.ffn(self.ln2(x))


class ByteLM(torch.nn.Module):
    def __init__(self, args, kind, qk_norm=False, memory_plus=True, score_activation="softmax"):
        super().__init__()
        d = args.dim
        self.embed = torch.nn.Embedding(256, d)
        self.pos = torch.nn.Parameter(torch.randn(args.ctx, d) * 0.02)
        mem_macs = memory_macs(d, args.n_keys, args.mem_heads, args.knn, args.k_dim, d)
        self.memory = None
        blocks = []
        for i in range(args.layers):
            if i == args.layers // 2 and kind == "memory":
                import pkm_torch
                pkm_torch.load_library(args.torch_library)
                self.memory = pkm_torch.HashingMemory(d, d, n_keys=args.n_keys, heads=args.mem_heads, knn=args.knn,
                                                      k_dim=args.k_dim, memory_plus=memory_plus, qk_norm=qk_norm,
                                                      score_activation=score_activation)
                ffn = self.memory
            elif i == args.layers // 2:
                ffn = SwiGLU(d, round(mem_macs / (3 * d)))  # the same multiply-adds as the memory
            else:
                ffn = SwiGLU(d, args.ffn_hidden)
            blocks.append(Block(d, args.heads, ffn))
        self.blocks = torch.nn.ModuleList(blocks)
        self.ln = torch.nn.LayerNorm(d)
        self.out = torch.nn.Linear(d, 256, bias=False)
        self.register_buffer("mask", torch.triu(torch.ones(args.ctx, args.ctx, dtype=torch.bool), 1), persistent=False)
        self.middle_macs = mem_macs if kind == "memory" else blocks[args.layers // 2].ffn.macs(d)

    def forward(self, x):
        h = self.embed(x) + self.pos[: x.shape[1]]
        for b in self.blocks:
            h = b(h, self.mask)
        return self.out(self.ln(h))


def bits(model, x, y, from_pos=None):
    """Mean bits per predicted byte (of the positions >= from_pos[i] in row i, if given)."""
    logits = model(x)
    nll = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1), reduction="none").view(y.shape)
    if from_pos is None:
        return nll.mean().item() / math.log(2)
    keep = torch.arange(y.shape[1])[None, :] >= from_pos[:, None]
    return (nll * keep).sum().item() / keep.sum().item() / math.log(2)


def probe_batch(docs, ctx):
    """Each doc's first ctx + 1 bytes (padded with newlines) and where its definition starts
    (after the headword): the knowledge probe's inputs."""
    rows, starts = [], []
    for head, text in docs:
        b = (text + b"\n" * (ctx + 1))[: ctx + 1]
        rows.append(list(b))
        hb = len(head.encode("utf-8"))
        starts.append(min(hb, ctx - 1) if text.lower().startswith(head.lower().encode("utf-8")) else 0)
    w = torch.tensor(rows)
    # Only the doc's own bytes count: positions past its end are padding.
    ends = torch.tensor([min(len(t), ctx) for _, t in docs])
    return w[:, :-1], w[:, 1:], torch.tensor(starts), ends


def probe(model, batch):
    x, y, start, end = batch
    with torch.no_grad():
        logits = model(x)
    nll = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1), reduction="none").view(y.shape)
    pos = torch.arange(y.shape[1])[None, :]
    keep = (pos >= start[:, None]) & (pos < end[:, None] - 1)
    return (nll * keep).sum().item() / max(keep.sum().item(), 1) / math.log(2)


# ---- training -----------------------------------------------------------------------------------

def train(args, kind, label, minutes, train_stream, val_batch, probes, writer, lr, value_lr, **variant):
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model = ByteLM(args, kind, **variant)
    dense = [p for n, p in model.named_parameters() if not n.endswith("memory.values.weight")]
    opt = torch.optim.AdamW(dense, lr=lr, weight_decay=0.0)
    value_opt = model.memory.fused_optimizer("adam", lr=value_lr) if model.memory is not None else None
    n_params = sum(p.numel() for p in model.parameters())
    t0, steps, evals = time.time(), 0, []
    budget = minutes * 60
    next_eval = 0.0
    tty = sys.stderr.isatty()
    while True:
        elapsed = time.time() - t0
        if elapsed >= next_eval or elapsed >= budget:
            model.eval()
            with torch.no_grad():
                vb = bits(model, *val_batch)
            model.train()
            evals.append((elapsed, steps, vb))
            writer.writerow([label, "%.1f" % elapsed, steps, steps * args.batch * args.ctx, "%.4f" % vb])
            next_eval += args.eval_seconds
            if elapsed >= budget:
                break
        x, y = train_stream.batch(rng, args.batch, args.ctx)
        loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dense, 1.0)
        opt.step()
        if value_opt is not None:
            value_opt.step()
        steps += 1
        if tty and steps % 10 == 0:
            frac = min(1.0, (time.time() - t0) / budget)
            bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
            sys.stderr.write("\r%-22s [%s] step %5d  loss %.3f bpb  val %.3f  %4.0f s " %
                             (label, bar, steps, loss.item() / math.log(2), evals[-1][2], time.time() - t0))
    model.eval()
    held_in, held_out = probe(model, probes[0]), probe(model, probes[1])
    sys.stderr.write("\r%-22s done: %d steps, val %.3f bpb, probe held-in %.3f / held-out %.3f bpb%s\n" %
                     (label, steps, evals[-1][2], held_in, held_out, " " * 20))
    return {"label": label, "steps": steps, "tokens": steps * args.batch * args.ctx, "val": evals[-1][2],
            "best": min(e[2] for e in evals), "held_in": held_in, "held_out": held_out, "params": n_params,
            "middle_macs": model.middle_macs, "evals": evals}


def at_tokens(evals, tokens_per_step, tokens):
    """Validation bpb interpolated at `tokens` from a run's (seconds, steps, bpb) curve."""
    pts = [(s * tokens_per_step, b) for _, s, b in evals]
    for (t0, b0), (t1, b1) in zip(pts, pts[1:]):
        if t0 <= tokens <= t1:
            return b0 + (b1 - b0) * (tokens - t0) / max(t1 - t0, 1)
    return pts[-1][1]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dict", default="/usr/share/dictd/gcide", help="a dictd dictionary (GCIDE by default)")
    p.add_argument("--minutes", type=float, default=6.0, help="training time of each model")
    p.add_argument("--csv", default="gcide_lm.csv")
    p.add_argument("--variants", action="store_true",
                   help="also train the memory variants (no gate, qk-norm, relu, relu + qk-norm)")
    p.add_argument("--variant-minutes", type=float, default=2.0)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn-hidden", type=int, default=256)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--n-keys", type=int, default=256)
    p.add_argument("--mem-heads", type=int, default=4)
    p.add_argument("--knn", type=int, default=16)
    p.add_argument("--k-dim", type=int, default=32)
    p.add_argument("--dense-lr", type=float, default=3e-3, help="AdamW, the dense model")
    p.add_argument("--memory-lr", type=float, default=3e-3, help="AdamW, the memory model's dense parameters")
    p.add_argument("--value-lr", type=float, default=1e-2, help="the memory's value table (pkm's lazy Adam)")
    p.add_argument("--model", choices=["dense", "memory", "both", "none"], default="both",
                   help="the models trained for --minutes (none: only --variants)")
    p.add_argument("--eval-seconds", type=float, default=20.0)
    p.add_argument("--val-windows", type=int, default=256)
    p.add_argument("--probe", type=int, default=400, help="entries per side of the knowledge probe")
    p.add_argument("--val-every", type=int, default=20, help="1 headword in N (by hash) is validation")
    p.add_argument("--torch-library", default=None, help="pkm's operator library (default: build/python/)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    t = time.time()
    try:
        d, train_docs, val_docs = load(args.dict, args.val_every)
    except ValueError as e:
        sys.exit("gcide_lm: %s" % e)
    train_stream, val_stream = Stream(train_docs), Stream(val_docs)
    rng = random.Random(12345)
    val_batch = val_stream.batch(rng, args.val_windows, args.ctx)
    probes = (probe_batch(rng.sample(train_docs, min(args.probe, len(train_docs))), args.ctx),
              probe_batch(rng.sample(val_docs, min(args.probe, len(val_docs))), args.ctx))
    print("gcide_lm: %s: %d index entries -> %d training entries (%.1f MB), %d validation entries (%.1f MB), "
          "split by headword (%.1f s)" % (d.name, len(d.index), len(train_docs), len(train_stream.data) / 1e6,
                                          len(val_docs), len(val_stream.data) / 1e6, time.time() - t))
    print("model: bytes, d %d, %d blocks, %d attention heads, context %d, batch %d; FFN SwiGLU hidden %d; "
          "middle block: dense SwiGLU or Memory+ (%d^2 slots, %d heads, knn %d, k_dim %d) at equal MACs; "
          "%g minutes each, %d threads, torch %s" %
          (args.dim, args.layers, args.heads, args.ctx, args.batch, args.ffn_hidden, args.n_keys, args.mem_heads,
           args.knn, args.k_dim, args.minutes, args.threads, torch.__version__))
    results = []
    with open(args.csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "seconds", "steps", "tokens", "val_bpb"])
        if args.model in ("dense", "both"):
            results.append(train(args, "dense", "dense", args.minutes, train_stream, val_batch, probes, w,
                                 args.dense_lr, None))
        if args.model in ("memory", "both"):
            results.append(train(args, "memory", "memory", args.minutes, train_stream, val_batch, probes, w,
                                 args.memory_lr, args.value_lr))
        if args.variants:
            for label, variant in (("memory, no gate", {"memory_plus": False}), ("memory, qk-norm", {"qk_norm": True}),
                                   ("memory, relu", {"score_activation": "relu"}),
                                   ("memory, relu + qk-norm", {"score_activation": "relu", "qk_norm": True}),
                                   ("memory (short)", {})):
                results.append(train(args, "memory", label, args.variant_minutes, train_stream, val_batch, probes, w,
                                     args.memory_lr, args.value_lr, **variant))
            results.append(train(args, "dense", "dense (short)", args.variant_minutes, train_stream, val_batch, probes,
                                 w, args.dense_lr, None))
    tps = args.batch * args.ctx
    print("\n| model | middle block MACs/token | params | steps | bytes seen | val bpb (end) | val bpb (best) | "
          "probe held-in bpb | probe held-out bpb | held-out - held-in |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print("| %s | %d | %d | %d | %.1f M | %.3f | %.3f | %.3f | %.3f | %.3f |" %
              (r["label"], r["middle_macs"], r["params"], r["steps"], r["tokens"] / 1e6, r["val"], r["best"],
               r["held_in"], r["held_out"], r["held_out"] - r["held_in"]))
    by = {r["label"]: r for r in results}
    if "dense" in by and "memory" in by:
        m, dn = by["memory"], by["dense"]
        print("\nequal wall-clock (%g min): memory %.3f bpb, dense %.3f bpb (%+.3f)" %
              (args.minutes, m["val"], dn["val"], m["val"] - dn["val"]))
        lo = min(m["tokens"], dn["tokens"])
        print("equal bytes seen (%.1f M): memory %.3f bpb, dense %.3f bpb" %
              (lo / 1e6, at_tokens(m["evals"], tps, lo), at_tokens(dn["evals"], tps, lo)))
    print("curves: %s" % args.csv)


if __name__ == "__main__":
    main()
