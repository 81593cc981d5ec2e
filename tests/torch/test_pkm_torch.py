#!/usr/bin/env python3
"""pkm_torch (pkm's layer as a PyTorch operator) against the pure-PyTorch reference module of
tests/reference/make_golden.py: forward and every gradient within 1e-5, gradcheck in double,
strict state_dict loading, the sparse gradient with SparseAdam and the fused optimizers against
dense-gradient reference steps, (B, T, C) input, a shared table, and bad input.

It also trains a pkm_torch layer a few steps, saves it with python/pkm_export.py and checks that
pkm's C++ side (pkm_run) computes the same output from the file.

Usage: test_pkm_torch.py LIBRARY [PKM_RUN WORK_DIR]   (exit 77, CTest's "skipped", without PyTorch)
"""
import os
import sys

try:
    import torch
except ImportError:
    print("PyTorch is not installed (Debian: apt-get install python3-torch): skipped", file=sys.stderr)
    sys.exit(77)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "reference"))
sys.path.insert(0, os.path.join(HERE, "..", "..", "python"))
import make_golden  # noqa: E402
import pkm_export  # noqa: E402
import pkm_torch  # noqa: E402
import subprocess  # noqa: E402

FAILS = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        FAILS.append(what)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / max(b.norm().item(), 1e-30)).item()


CONFIGS = {
    "memplus": dict(input_dim=16, heads=4, n_keys=8, k_dim=8, knn=4, v_dim=12, output_dim=16),
    "gated": dict(input_dim=16, heads=4, n_keys=8, k_dim=8, knn=4, v_dim=12, output_dim=16, gating=True),
    "plain": dict(input_dim=12, heads=2, n_keys=7, k_dim=6, knn=3, v_dim=10, output_dim=9, memory_plus=False),
    "noproj": dict(input_dim=12, heads=2, n_keys=6, k_dim=4, knn=3, v_dim=8, output_dim=8, memory_plus=False,
                   value_projection=False),
    "noqbias_qknorm": dict(input_dim=10, heads=2, n_keys=9, k_dim=8, knn=5, v_dim=6, output_dim=10,
                           query_bias=False, qk_norm=True, qk_norm_scale=2.5),
}


def pair(args, sparse=True, dtype=torch.float32, values_dtype=None):
    """A reference module and a pkm_torch one holding the same parameters (strict load)."""
    ref = make_golden.Memory(**args).to(dtype)
    mem = pkm_torch.HashingMemory(
        input_dim=args["input_dim"], output_dim=args["output_dim"], mem_n_keys=args["n_keys"],
        mem_heads=args["heads"], mem_knn=args["knn"], mem_k_dim=args["k_dim"], mem_v_dim=args["v_dim"],
        swilu_projection=args.get("memory_plus", True), value_projection=args.get("value_projection", True),
        gating=args.get("gating", False), query_bias=args.get("query_bias", True),
        qk_norm=args.get("qk_norm", False), qk_norm_scale=args.get("qk_norm_scale"), sparse=sparse).to(dtype)
    mem.load_state_dict(ref.state_dict(), strict=True)
    if values_dtype is not None and values_dtype != dtype:
        mem.values.weight.data = mem.values.weight.data.to(values_dtype)
        ref.values.weight.data = mem.values.weight.data.to(dtype)
    return ref, mem


def test_against_reference():
    torch.manual_seed(0)
    for name, args in CONFIGS.items():
        for sparse in (True, False):
            ref, mem = pair(args, sparse)
            x = torch.randn(10, args["input_dim"])
            dy = torch.randn(10, args["output_dim"])
            xr, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
            yr = ref(xr)[0]
            yp = mem(xp)
            check(rel(yp, yr) < 1e-5, "%s: forward (%.2g)" % (name, rel(yp, yr)))
            (yr * dy).sum().backward()
            (yp * dy).sum().backward()
            check(rel(xp.grad, xr.grad) < 1e-5, "%s: dx" % name)
            refp = dict(ref.named_parameters())
            for pname, p in mem.named_parameters():
                g = p.grad.to_dense() if p.grad.is_sparse else p.grad
                if pname == "values.weight":
                    check(p.grad.is_sparse == sparse, "%s: values.weight's gradient is %s" %
                          (name, "sparse" if sparse else "dense"))
                check(rel(g, refp[pname].grad) < 1e-5, "%s (sparse=%s): grad %s (%.2g)" %
                      (name, sparse, pname, rel(g, refp[pname].grad)))


def test_btc_and_bf16():
    torch.manual_seed(1)
    args = CONFIGS["gated"]
    ref, mem = pair(args, values_dtype=torch.bfloat16)
    check(mem.values.weight.dtype == torch.bfloat16, "bf16 table kept as bf16")
    x = torch.randn(2, 5, args["input_dim"])
    y = mem(x)
    check(tuple(y.shape) == (2, 5, args["output_dim"]), "(B, T, C) in, (B, T, output_dim) out")
    yr = ref(x.view(10, -1))[0].view(2, 5, -1)
    check(rel(y, yr) < 1e-5, "bf16 table: forward (%.2g)" % rel(y, yr))
    y.sum().backward()
    check(mem.values.weight.grad.dtype == torch.bfloat16, "bf16 table: its gradient is bf16")


def test_gradcheck():
    torch.manual_seed(2)
    args = dict(input_dim=5, heads=2, n_keys=4, k_dim=4, knn=2, v_dim=3, output_dim=4, gating=True)
    _, mem = pair(args, sparse=False, dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    params = [mem.keys, mem.query_proj.query_mlps[0].weight, mem.query_proj.query_mlps[0].bias,
              mem.swilu_projection.weight, mem.swilu_projection.bias, mem.value_proj.weight, mem.value_proj.bias,
              mem.gating.weight, mem.gating.bias, mem.values.weight]

    def f(x, *p):
        return torch.ops.pkm.memory(x, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], 2, 2, False,
                                    0.0, False, None)
    ok = torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)
    check(ok, "gradcheck in double: x and every parameter")


def test_sparse_adam_and_fused():
    torch.manual_seed(3)
    args = CONFIGS["memplus"]
    x = torch.randn(10, args["input_dim"])
    dy = torch.randn(10, args["output_dim"])
    # The dense-gradient reference: autograd's dense table gradient, made sparse by rows.
    ref, mem = pair(args)
    state0 = {k: v.clone() for k, v in ref.state_dict().items()}
    (ref(x)[0] * dy).sum().backward()
    gref = ref.values.weight.grad
    rows = gref.abs().sum(1).nonzero().flatten()
    ref_sparse = torch.sparse_coo_tensor(rows.unsqueeze(0), gref[rows], gref.shape)
    w0 = mem.values.weight.detach().clone()
    ref.values.weight.grad = ref_sparse
    torch.optim.SparseAdam([ref.values.weight], lr=0.01).step()
    (mem(x) * dy).sum().backward()
    torch.optim.SparseAdam([mem.values.weight], lr=0.01).step()
    check(rel(mem.values.weight.detach() - w0, ref.values.weight.detach() - w0) < 1e-5,
          "sparse gradient + SparseAdam = the dense gradient's SparseAdam step")

    for kind in ("adagrad", "adam"):
        _, mem = pair(args)
        mem.load_state_dict(state0)
        w0 = mem.values.weight.detach().clone()
        opt = mem.fused_optimizer(kind, lr=0.01)
        (mem(x) * dy).sum().backward()
        check(mem.values.weight.grad is None, "%s fused: the table gets no gradient" % kind)
        check(opt.steps() == 1, "%s fused: one step taken" % kind)
        g = gref[rows]
        if kind == "adagrad":  # h = mean(g^2) over the row; w -= lr g / (sqrt(h) + eps)
            h = (g * g).mean(1, keepdim=True)
            want = -0.01 * g / (h.sqrt() + 1e-8)
        else:  # first lazy Adam step: m = (1-b1) g, v = (1-b2) g^2, bias-corrected
            m = 0.1 * g / 0.1
            v = 0.001 * g * g / 0.001
            want = -0.01 * m / (v.sqrt() + 1e-8)
        got = (mem.values.weight.detach() - w0)[rows]
        check(rel(got, want) < 1e-4, "%s fused: the step equals the dense-gradient rule (%.2g)" % (kind, rel(got, want)))
        untouched = torch.ones(w0.shape[0], dtype=torch.bool)
        untouched[rows] = False
        check(torch.equal(mem.values.weight.detach()[untouched], w0[untouched]), "%s fused: other rows unchanged" % kind)


def test_shared_values():
    torch.manual_seed(4)
    args = CONFIGS["memplus"]
    _, a = pair(args, sparse=False)
    b = pkm_torch.HashingMemory(input_dim=16, output_dim=16, mem_n_keys=8, mem_heads=4, mem_knn=4, mem_k_dim=8,
                                mem_v_dim=12, values=a.values, sparse=False)
    x = torch.randn(6, 16)
    (a(x).sum() + b(a(x)).sum()).backward()
    check(a.values.weight is b.values.weight and a.values.weight.grad is not None, "a table shared by two layers")


def test_bad_input():
    args = CONFIGS["memplus"]
    _, mem = pair(args)
    # pkm's std::invalid_argument arrives as ValueError, std::out_of_range as IndexError and
    # std::runtime_error as RuntimeError, each with pkm's message.
    for what, x, kind, msg in (("wrong width", torch.randn(3, 17), ValueError, "x has 17 columns, expected input_dim = 16"),
                               ("NaN", torch.full((2, 16), float("nan")), ValueError, "not finite"),
                               ("int64 input", torch.ones(2, 16, dtype=torch.long), ValueError, "expected float32")):
        try:
            mem(x)
            check(False, "bad input (%s) raises" % what)
        except kind as e:
            check(msg in str(e), "bad input (%s): %s with pkm's message (%s)" % (what, kind.__name__, str(e)[:120]))
    bad = pkm_torch.HashingMemory(input_dim=16, output_dim=16, mem_n_keys=8, mem_heads=4, mem_knn=4, mem_k_dim=8,
                                  mem_v_dim=12)
    bad.values.weight.data = torch.randn(60, 12)
    try:
        bad(torch.randn(2, 16))
        check(False, "a table of the wrong size raises")
    except ValueError as e:
        check("values has 60 rows, expected n_keys^2 = 64" in str(e), "a table of the wrong size: pkm's message")


def test_train_then_load_in_cpp(pkm_run, work):
    torch.manual_seed(5)
    args = CONFIGS["gated"]
    _, mem = pair(args)
    dense = [p for n, p in mem.named_parameters() if n != "values.weight"]
    adam = torch.optim.Adam(dense, lr=1e-2)
    sparse_adam = torch.optim.SparseAdam([mem.values.weight], lr=1e-2)
    x = torch.randn(32, args["input_dim"])
    target = torch.randn(32, args["output_dim"])
    losses = []
    for _ in range(5):
        adam.zero_grad()
        sparse_adam.zero_grad()
        loss = torch.nn.functional.mse_loss(mem(x), target)
        loss.backward()
        adam.step()
        sparse_adam.step()
        losses.append(loss.item())
    check(losses[-1] < losses[0], "training with Adam + SparseAdam lowers the loss (%.4f -> %.4f)" % (losses[0], losses[-1]))
    os.makedirs(work, exist_ok=True)
    ckpt, inp, out = (os.path.join(work, f) for f in ("trained.safetensors", "in.safetensors", "out.safetensors"))
    pkm_export.export_memory(mem, ckpt, knn=args["knn"])
    pkm_export.write_input(inp, x)
    subprocess.run([pkm_run, "--checkpoint", ckpt, "--input", inp, "--output", out], check=True,
                   stdout=subprocess.DEVNULL)
    got, _ = pkm_export.read_safetensors(out)
    with torch.no_grad():
        y = mem(x)
    check(rel(got["y"], y) < 1e-5, "the saved layer loads in pkm's C++ side (pkm_run) with the same output (%.2g)" %
          rel(got["y"], y))


def main():
    pkm_torch.load_library(sys.argv[1] if len(sys.argv) > 1 else None)
    torch.set_num_threads(2)
    for t in (test_against_reference, test_btc_and_bf16, test_gradcheck, test_sparse_adam_and_fused,
              test_shared_values, test_bad_input):
        t()
    if len(sys.argv) > 3:
        test_train_then_load_in_cpp(sys.argv[2], sys.argv[3])
    print("%d failed" % len(FAILS))
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
