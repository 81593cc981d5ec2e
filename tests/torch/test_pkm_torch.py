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
    import torch.nn.functional as F
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


def check_against(label, ref_call, ref, mem, x, dy, sparse=None):
    """mem's forward, dx and every parameter's gradient against the reference's (ref_call(x):
    the reference's output), within 1e-5; the table's gradient sparse or dense as asked.
    Returns the reference's output."""
    xr, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr = ref_call(xr)
    yp = mem(xp)
    check(rel(yp, yr) < 1e-5, "%s: forward (%.2g)" % (label, rel(yp, yr)))
    (yr * dy).sum().backward()
    (yp * dy).sum().backward()
    check(rel(xp.grad, xr.grad) < 1e-5, "%s: dx" % label)
    refp = dict(ref.named_parameters())
    for pname, p in mem.named_parameters():
        g = p.grad.to_dense() if p.grad.is_sparse else p.grad
        if pname == "values.weight" and sparse is not None:
            check(p.grad.is_sparse == sparse, "%s: values.weight's gradient is %s" %
                  (label, "sparse" if sparse else "dense"))
        check(rel(g, refp[pname].grad) < 1e-5, "%s: grad %s (%.2g)" % (label, pname, rel(g, refp[pname].grad)))
    return yr.detach()


def test_against_reference():
    torch.manual_seed(0)
    for name, args in CONFIGS.items():
        for sparse in (True, False):
            ref, mem = pair(args, sparse)
            x = torch.randn(10, args["input_dim"])
            dy = torch.randn(10, args["output_dim"])
            check_against("%s (sparse=%s)" % (name, sparse), lambda xr: ref(xr)[0], ref, mem, x, dy, sparse)


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
                                    None, False, None)
    ok = torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)
    check(ok, "gradcheck in double: x and every parameter")


class _ReluWeights:
    """torch.nn.functional with softmax replaced by ReLU: the reference module's weights made
    ReLU(score), the score_activation="relu" layer's."""

    def __getattr__(self, name):
        return getattr(F, name)

    @staticmethod
    def softmax(x, dim=-1):
        return torch.relu(x)


def test_relu_activation():
    torch.manual_seed(4)
    for name in ("memplus", "noqbias_qknorm"):
        args = CONFIGS[name]
        ref, base = pair(args)
        mem = pkm_torch.HashingMemory(
            input_dim=args["input_dim"], output_dim=args["output_dim"], n_keys=args["n_keys"], heads=args["heads"],
            knn=args["knn"], k_dim=args["k_dim"], v_dim=args["v_dim"], query_bias=args.get("query_bias", True),
            qk_norm=args.get("qk_norm", False), qk_norm_scale=args.get("qk_norm_scale"), score_activation="relu",
            sparse=True)
        mem.load_state_dict(base.state_dict(), strict=True)
        x = torch.randn(10, args["input_dim"])
        dy = torch.randn(10, args["output_dim"])

        def relu_reference(xr):
            saved = make_golden.F
            make_golden.F = _ReluWeights()
            try:
                return ref(xr)[0]
            finally:
                make_golden.F = saved
        yr = check_against("relu " + name, relu_reference, ref, mem, x, dy)
        check(rel(yr, base(x)) > 1e-3, "relu %s: differs from softmax" % name)
        with torch.no_grad():  # the inference path (ForwardState) too
            check(rel(mem(x), yr) < 1e-5, "relu %s: no_grad forward" % name)
    # gradcheck in double, and a bad name refused
    args = dict(input_dim=5, heads=2, n_keys=4, k_dim=4, knn=2, v_dim=3, output_dim=4)
    _, m64 = pair(args, sparse=False, dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    params = [m64.keys, m64.query_proj.query_mlps[0].weight, m64.query_proj.query_mlps[0].bias,
              m64.swilu_projection.weight, m64.swilu_projection.bias, m64.value_proj.weight, m64.value_proj.bias,
              m64.values.weight]

    def f(x, *p):
        return torch.ops.pkm.memory(x, p[0], p[1], p[2], p[3], p[4], p[5], p[6], None, None, p[7], 2, 2, False,
                                    None, False, None, "F32", None, "relu")
    ok = torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)
    check(ok, "relu: gradcheck in double")
    expect_error(ValueError, "score_activation = 'gelu' is not supported",
                 lambda: pkm_torch.HashingMemory(16, 16, n_keys=8, k_dim=8, knn=4, score_activation="gelu"),
                 "score_activation='gelu'")
    # Served from its int8 table: the quantized op takes the activation too (the bytes decoded
    # here, in a float ReLU module, give its output; the softmax module's differs).
    import copy
    args = CONFIGS["memplus"]
    _, soft = pair(args)
    relu = copy.deepcopy(soft)
    relu.score_activation = "relu"
    x = torch.randn(6, args["input_dim"])
    q = pkm_torch.QuantizedHashingMemory(relu, "int8")
    decoded = copy.deepcopy(relu)
    decoded.values.weight.data = dequantized_int8(q.values.weight, args["v_dim"])
    with torch.no_grad():
        yq, yd = q(x), decoded(x)
        ys = pkm_torch.QuantizedHashingMemory(soft, "int8")(x)
    check(rel(yq, yd) < 1e-5, "relu int8: the decoded table in a float relu module gives the output (%.3g)" %
          rel(yq, yd))
    check(rel(yq, ys) > 1e-3, "relu int8: differs from the softmax module's")
    # Exported for C++: the metadata says relu (test_io.cpp loads such a file); softmax says nothing.
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "pkm_relu_export_%d.safetensors" % os.getpid())
    try:
        pkm_export.export_memory(relu, path, knn=args["knn"], score_activation="relu")
        check(pkm_export.read_safetensors(path)[1].get("score_activation") == "relu", "export: relu in the metadata")
        pkm_export.export_memory(soft, path, knn=args["knn"])
        check("score_activation" not in pkm_export.read_safetensors(path)[1], "export: nothing for softmax")
    finally:
        if os.path.exists(path):
            os.remove(path)
    expect_error(ValueError, "score_activation = 'gelu', expected 'softmax' or 'relu'",
                 lambda: pkm_export.export_memory(relu, path, knn=4, score_activation="gelu"), "export gelu")


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
    # Served from an int4 table: exported, then pkm_run (forward only) gives the module's output.
    q = pkm_torch.QuantizedHashingMemory(mem, "int4")
    qckpt = os.path.join(work, "trained-int4.safetensors")
    pkm_export.export_memory(q, qckpt, knn=args["knn"])
    subprocess.run([pkm_run, "--checkpoint", qckpt, "--input", inp, "--output", out], check=True,
                   stdout=subprocess.DEVNULL)
    got, _ = pkm_export.read_safetensors(out)
    back, meta = pkm_export.read_safetensors(qckpt)
    with torch.no_grad():
        yq = q(x)
    check(rel(got["y"], yq) < 1e-6 and meta.get("pkm_values_format") == "INT4_ROWWISE" and
          back["values.weight"].dtype == torch.uint8,
          "an exported int4 module runs in pkm_run with the module's output (%.2g)" % rel(got["y"], yq))


def expect_error(kind, msg, fn, what):
    try:
        fn()
        check(False, "%s raises" % what)
    except kind as e:
        check(msg in str(e), "%s: %s with pkm's message (%s)" % (what, kind.__name__, str(e)[:150]))


def test_full_shapes():
    """Optional tensors are checked by their whole shape: a transposed weight of the right
    element count used to be read in the wrong layout."""
    args = CONFIGS["memplus"]  # input_dim 16, v_dim 12
    _, mem = pair(args)
    q = mem.query_proj.query_mlps[0]
    base = [mem.keys, q.weight, q.bias, mem.swilu_projection.weight, mem.swilu_projection.bias,
            mem.value_proj.weight, mem.value_proj.bias, None, None, mem.values.weight]
    x = torch.randn(3, 16)

    def call(i, t):
        p = list(base)
        p[i] = t
        return torch.ops.pkm.memory(x, *p, 4, 4, False, None, False, None)
    expect_error(ValueError, "swilu_projection.weight has shape (16, 12), expected (12, 16)",
                 lambda: call(3, mem.swilu_projection.weight.detach().t().contiguous()), "a transposed Memory+ weight")
    expect_error(ValueError, "swilu_projection.bias has shape (3, 4), expected (12)",
                 lambda: call(4, torch.zeros(3, 4)), "a (3, 4) bias for (12,)")
    expect_error(ValueError, "value_proj.weight has shape (16, 12, 1), expected (output_dim, 12)",
                 lambda: call(5, torch.zeros(16, 12, 1)), "a 3-d weight")
    expect_error(ValueError, "x is on meta", lambda: mem(torch.empty(3, 16, device="meta")), "x on the meta device")


def test_fused_twice_in_one_loss():
    """One HashingMemory called twice in a loss, fused: dx and every dense gradient are taken
    against the table as the forwards saw it (they equal the unfused module's), and the table
    takes one step from the two uses' summed gradient."""
    torch.manual_seed(6)
    args = CONFIGS["memplus"]
    ref, _ = pair(args, sparse=False)
    _, plain = pair(args, sparse=False)
    _, fused = pair(args)
    plain.load_state_dict(ref.state_dict())
    fused.load_state_dict(ref.state_dict())
    w0 = fused.values.weight.detach().clone()
    opt = fused.fused_optimizer("adagrad", lr=0.05)
    x = torch.randn(8, 16)
    dy = torch.randn(8, 16)

    def loss(m, xx):
        return (m(m(xx)) * dy).sum() + (m(xx) * dy).sum()  # three uses in one loss
    xp, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss(plain, xp).backward()
    loss(fused, xf).backward()
    check(rel(xf.grad, xp.grad) < 1e-6, "fused, three uses: dx against the unchanged table (%.2g)" % rel(xf.grad, xp.grad))
    fp = dict(fused.named_parameters())
    worst = max(rel(p.grad, fp[n].grad) for n, p in plain.named_parameters() if n != "values.weight")
    check(worst < 1e-6, "fused, three uses: every dense gradient against the unchanged table (%.2g)" % worst)
    check(opt.steps() == 1, "fused, three uses: one step (%d)" % opt.steps())
    g = plain.values.weight.grad
    rows = g.abs().sum(1).nonzero().flatten()
    gr = g[rows]
    want = w0.clone()
    want[rows] -= 0.05 * gr / ((gr * gr).mean(1, keepdim=True).sqrt() + 1e-8)
    check(rel(fused.values.weight.detach(), want) < 1e-6, "fused, three uses: the table takes one Adagrad step of the "
          "summed gradient (%.2g)" % rel(fused.values.weight.detach(), want))
    # A use whose output is dropped without a backward does not hold the update back for ever:
    # the next forward applies it before reading the table.
    _, lone = pair(args)
    lone.load_state_dict(ref.state_dict())
    opt2 = lone.fused_optimizer("adagrad", lr=0.05)
    kept = lone(x)  # never backwarded, kept alive
    (lone(x) * dy).sum().backward()
    check(opt2.pending_rows() > 0 and opt2.steps() == 0, "a graph alive without backward: the step waits")
    with torch.no_grad():
        lone(x)
    check(opt2.pending_rows() == 0 and opt2.steps() == 1, "the next forward applies the waiting step")
    del kept


def test_gradient_accumulation():
    """accumulate=True: micro-batch backwards add their rows, step() applies their sum once; the
    same table as one fused step over the whole batch."""
    torch.manual_seed(7)
    args = CONFIGS["gated"]
    ref, _ = pair(args)
    x, dy = torch.randn(12, 16), torch.randn(12, 16)
    _, whole = pair(args)
    _, micro = pair(args)
    whole.load_state_dict(ref.state_dict())
    micro.load_state_dict(ref.state_dict())
    ow = whole.fused_optimizer("adam", lr=0.01)
    om = micro.fused_optimizer("adam", lr=0.01, accumulate=True)
    (whole(x) * dy).sum().backward()
    for i in range(3):
        (micro(x[4 * i:4 * i + 4]) * dy[4 * i:4 * i + 4]).sum().backward()
    check(om.steps() == 0 and om.pending_rows() > 0, "accumulate: nothing applied before step()")
    norm = om.step()
    check(om.steps() == 1 and om.pending_rows() == 0, "accumulate: step() applies once")
    check(abs(norm - ow.step()) <= 1e-5 * norm, "accumulate: the same gradient norm as one step over the batch")
    d = rel(micro.values.weight.detach(), whole.values.weight.detach())
    check(d < 1e-6, "accumulate: the same table as one step over the whole batch (%.2g)" % d)
    om.zero_grad()
    (micro(x[:4]) * dy[:4]).sum().backward()
    om.zero_grad()
    check(om.pending_rows() == 0, "accumulate: zero_grad drops the accumulated rows")


def test_state_pickle_and_names(work):
    """The fused optimizer's state is in state_dict and pickles; torch.save / deepcopy work;
    a model pickled here loads and runs in a fresh process without load_library(); the
    reference's argument names are accepted, its unsupported options refused."""
    import copy
    torch.manual_seed(8)
    args = CONFIGS["memplus"]
    ref, mem = pair(args)
    opt = mem.fused_optimizer("adam", lr=0.01)
    x, dy = torch.randn(6, 16), torch.randn(6, 16)
    (mem(x) * dy).sum().backward()
    sd = mem.state_dict()
    check(all(k in sd for k in ("fused_optimizer.step", "fused_optimizer.exp_avg", "fused_optimizer.config")),
          "state_dict holds the fused optimizer's state")
    _, back = pair(args)
    back.fused_optimizer("adam", lr=0.5)
    back.load_state_dict(sd, strict=True)
    check(back._fused.steps() == 1 and back._fused.lr == 0.01, "load_state_dict restores the optimizer's state and lr")
    for m in (mem, back):
        (m(x) * dy).sum().backward()
    check(torch.equal(mem.values.weight, back.values.weight), "after a restore the next step is bit for bit the same")
    _, plain = pair(args)
    r = plain.load_state_dict(sd, strict=False)
    check("fused_optimizer.step" in r.unexpected_keys and not r.missing_keys,
          "strict=False into a module without a fused optimizer: its keys are unexpected")
    try:
        plain.load_state_dict(sd, strict=True)
        check(False, "optimizer state into a module without a fused optimizer is refused")
    except RuntimeError as e:
        check("fused_optimizer.step" in str(e), "optimizer state into a module without one: refused, naming the keys")
    bad = dict(sd)
    bad["fused_optimizer.exp_avg_sq"] = -bad["fused_optimizer.exp_avg_sq"] - 1
    try:
        back.load_state_dict(bad)
        check(False, "a negative second moment is refused")
    except RuntimeError as e:
        check("finite values >= 0" in str(e), "a negative second moment: refused with the rule")
    twin = copy.deepcopy(mem)
    check(twin._fused.steps() == mem._fused.steps() and twin._fused.table is twin.values.weight,
          "deepcopy copies the optimizer and points it at the copy's table")
    path = os.path.join(work, "fused_module.pt")
    os.makedirs(work, exist_ok=True)
    torch.save(mem, path)
    torch.save(x, path + ".x")
    with torch.no_grad():
        torch.save(mem(x), path + ".y")
    code = ("import sys, torch; sys.path.insert(0, %r); import pkm_torch; m = torch.load(%r); x = torch.load(%r); "
            "y = torch.load(%r); assert torch.equal(m(x), y), 'different output'; print('steps', m._fused.steps())" %
            (os.path.join(HERE, "..", "..", "python"), path, path + ".x", path + ".y"))
    env = dict(os.environ, PKM_TORCH_LIBRARY=pkm_torch._loaded)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    check(run.returncode == 0 and "steps 2" in run.stdout,
          "torch.save(module) loads and runs in a fresh process (%s)" % (run.stdout + run.stderr).strip()[-200:])

    # The reference's names: a drop-in constructor call, reset_parameters, AdamW on everything.
    m = pkm_torch.HashingMemory(16, 16, mem_n_keys=8, mem_heads=2, mem_knn=4, mem_k_dim=8, mem_v_dim=-1,
                                mem_gated=True, mem_query_bias=False, mem_share_values=False, value_fixed_lr=0.002,
                                mem_input_dropout=0.1, mem_value_dropout=0.1, swilu_projection=True)
    check(m.gating is not None and m.query_proj.query_mlps[0].bias is None, "mem_gated and mem_query_bias take effect")
    check(m.values.weight.fixed_lr == 0.002 and m.values.weight.pk_value_param, "value_fixed_lr as the reference sets it")
    m.reset_parameters()
    adamw = torch.optim.AdamW(m.parameters(), lr=1e-3)
    (m(torch.randn(5, 16)) ** 2).sum().backward()
    adamw.step()
    check(True, "torch.optim.AdamW(model.parameters()) steps the default (dense) module")
    scripted = torch.jit.script(m.eval())
    xs = torch.randn(4, 16)
    check(torch.equal(scripted(xs), m(xs)), "torch.jit.script runs the module, same output")
    a = pkm_torch.HashingMemory(16, 16, mem_n_keys=8, mem_heads=2, mem_knn=4, mem_k_dim=8, mem_share_values=True)
    b = pkm_torch.HashingMemory(16, 16, mem_n_keys=8, mem_heads=2, mem_knn=4, mem_k_dim=8, mem_share_values=True)
    check(a.values is b.values, "mem_share_values=True shares one table, as the reference")
    pkm_torch.HashingMemory.reset_shared_state()
    for kwargs, kind, msg in ((dict(mem_query_dropout=0.1), ValueError, "mem_query_dropout = 0.1 is not supported"),
                              (dict(peer_variant=True), ValueError, "peer_variant"),
                              (dict(mem_bogus=1), TypeError, "unknown argument 'mem_bogus'"),
                              (dict(gating=True, mem_gated=True), TypeError, "both set gating"),
                              (dict(qk_norm=True, qk_norm_scale=float("nan")), ValueError, "qk_norm_scale = nan"),
                              (dict(qk_norm=True, qk_norm_scale=-3.0), ValueError, "qk_norm_scale = -3"),
                              (dict(mem_knn=9), ValueError, "knn = 9 is out of range")):
        expect_error(kind, msg, lambda: pkm_torch.HashingMemory(16, 16, mem_n_keys=8, mem_heads=2, mem_k_dim=8,
                                                                **{"mem_knn": 4, **kwargs}),
                     "HashingMemory(%s)" % kwargs)


def test_autocast_bf16():
    """torch.autocast("cpu", dtype=torch.bfloat16) and bfloat16 input take pkm's bf16 products
    (MemoryConfig::compute = BF16): the same bits as asking the operator for compute="BF16",
    close to the fp32 layer, differentiable; another compute is refused."""
    torch.manual_seed(7)
    with open("/proc/cpuinfo") as f:
        if "avx512_bf16" not in f.read():  # fp32 there unless the emulation is asked for
            os.environ["PKM_BF16_KERNEL"] = "portable"
    args = dict(input_dim=64, heads=2, n_keys=16, k_dim=32, knn=8, v_dim=48, output_dim=64)
    _, mem = pair(args)
    x = torch.randn(40, args["input_dim"])
    with torch.no_grad():
        y32 = mem(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yac = mem(x)
        q = mem.query_proj.query_mlps[0]
        ops = (mem.keys, q.weight, q.bias, mem.swilu_projection.weight, mem.swilu_projection.bias,
               mem.value_proj.weight, mem.value_proj.bias, None, None, mem.values.weight,
               args["heads"], args["knn"], False, None, True, None)
        ybf = torch.ops.pkm.memory(x, *ops, "BF16")
        yf = torch.ops.pkm.memory(x, *ops, "F32")
        y16in = mem(x.bfloat16())
    check(yac.dtype == torch.float32, "autocast: the output stays float32 (%s)" % yac.dtype)
    check(torch.equal(yac, ybf), "autocast gives compute='BF16''s bits")
    check(torch.equal(yf, y32), "compute='F32' is the default path")
    check(not torch.equal(yac, y32) and rel(yac, y32) < 5e-2,
          "autocast: close to fp32, not equal (%.3g)" % rel(yac, y32))
    check(y16in.dtype == torch.bfloat16 and rel(y16in.float(), yac) < 1e-2,
          "bfloat16 x: bfloat16 out, the bf16 path (%.3g)" % rel(y16in.float(), yac))
    xr = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mem(xr)
    y.sum().backward()
    g16 = xr.grad.clone()
    xr.grad = None
    torch.ops.pkm.memory(xr, *ops, "BF16").sum().backward()
    check(torch.equal(g16, xr.grad), "autocast backward: compute='BF16''s dx bits")
    xr.grad = None
    mem.zero_grad()
    mem(xr).sum().backward()
    # Loose: a slot swapped at a head's top-k edge moves dx through the scores' gradient too.
    check(rel(g16, xr.grad) < 0.15, "autocast backward: dx close to fp32's (%.3g)" % rel(g16, xr.grad))
    expect_error(ValueError, "compute = 'F16' is not supported",
                 lambda: torch.ops.pkm.memory(x, *ops, "F16"), "compute='F16'")


def dequantized_int8(rows, v_dim):
    """The float table an INT8_ROWWISE uint8 tensor holds, decoded here from its bytes: v_dim
    codes, then fp32 scale and fp32 bias (FBGEMM's fused 8-bit row-wise layout)."""
    codes = rows[:, :v_dim].float()
    tail = rows[:, v_dim:v_dim + 8].contiguous().view(torch.float32)
    return codes * tail[:, :1] + tail[:, 1:2]


def test_quantized_serving():
    """QuantizedHashingMemory: a trained module served from its int8 / int4 / fp8 table, forward
    only; the int8 bytes decoded here give the same outputs; state_dict round trips (format
    included); gradients, bad formats and bad rows are refused."""
    import copy
    torch.manual_seed(11)
    for name in ("memplus", "gated", "noqbias_qknorm"):
        args = CONFIGS[name]
        _, mem = pair(args)
        x = torch.randn(3, 5, args["input_dim"])
        with torch.no_grad():
            y = mem(x)
        for fmt, tol in (("int8", 0.02), ("int4", 0.2), ("fp8", 0.08)):
            q = pkm_torch.QuantizedHashingMemory(mem, fmt)
            with torch.no_grad():
                yq = q(x)
            check(yq.shape == y.shape and rel(yq, y) < tol,
                  "%s %s: close to the fp32 module (%.3g)" % (name, fmt, rel(yq, y)))
            check(q.values.weight.dtype == torch.uint8 and q.values.weight.shape[0] == mem.values.weight.shape[0],
                  "%s %s: the table is uint8 rows %s" % (name, fmt, tuple(q.values.weight.shape)))
            if fmt == "int8":
                ref = copy.deepcopy(mem)
                ref.values.weight.data = dequantized_int8(q.values.weight, args["v_dim"])
                with torch.no_grad():
                    yd = ref(x)
                check(rel(yq, yd) < 1e-5, "%s int8: the bytes decoded in Python give the output (%.3g)" %
                      (name, rel(yq, yd)))
            # state_dict round trip into a module made from another memory of this shape.
            _, other = pair(args)
            q2 = pkm_torch.QuantizedHashingMemory(other, "int8" if fmt != "int8" else "int4")
            q2.load_state_dict(q.state_dict(), strict=True)
            with torch.no_grad():
                check(torch.equal(q2(x), yq) and q2.format == q.format,
                      "%s %s: state_dict round trip, format included" % (name, fmt))
                check(torch.equal(copy.deepcopy(q)(x), yq), "%s %s: deepcopy" % (name, fmt))
    _, mem = pair(CONFIGS["memplus"])
    q = pkm_torch.QuantizedHashingMemory(mem, "int8")
    x = torch.randn(4, 16, requires_grad=True)
    expect_error(ValueError, "inference only", lambda: q(x), "a quantized forward that needs a gradient")
    with torch.no_grad():
        check(q(x).shape == (4, 16), "the same call under no_grad runs")
    with torch.inference_mode():
        check(q(x.detach()).shape == (4, 16), "and under inference_mode")
    expect_error(ValueError, "format", lambda: pkm_torch.QuantizedHashingMemory(mem, "int3"), "format int3")
    expect_error(ValueError, "expected 'int8', 'int4' or 'fp8'",
                 lambda: torch.ops.pkm.quantize_values(mem.values.weight, "int2"), "quantize_values int2")
    bad = mem.values.weight.detach().clone()
    bad[5, 3] = float("nan")
    expect_error(ValueError, "row 5", lambda: torch.ops.pkm.quantize_values(bad, "int8"), "a NaN row")
    qm = mem.query_proj.query_mlps[0]
    with torch.no_grad():
        expect_error(ValueError, "bytes", lambda: torch.ops.pkm.memory_quantized(
            x, mem.keys, qm.weight, qm.bias, mem.swilu_projection.weight, mem.swilu_projection.bias,
            mem.value_proj.weight, mem.value_proj.bias, None, None, q.values.weight[:, :-1].contiguous(),
            "int8", 12, 4, 4, False, None), "rows of the wrong width")


def test_inference_state():
    """Under no_grad the module reuses its ForwardState (cache, parameter check): the same bits
    as the autograd path at every batch size, a parameter changed in place is checked again
    (a NaN put there is refused), and a copy runs on its own state."""
    import copy
    import threading
    torch.manual_seed(3)
    _, mem = pair(CONFIGS["gated"])
    xs = [torch.randn(b, 16) for b in (1, 64, 1, 8, 64)]
    want = [mem(x).detach() for x in xs]  # grad mode on, parameters require grad: autograd path
    with torch.no_grad():
        got = [mem(x) for x in xs]
    check(all(torch.equal(a, b) for a, b in zip(got, want)),
          "no_grad with the module's state: the autograd path's bits at batch 1, 64, 1, 8, 64")
    with torch.no_grad():
        keys = mem.keys.clone()
        mem.keys.add_(0.01)  # in place: bumps the tensor's version
        y_moved = mem(xs[0])
        mem.keys.copy_(keys)
    check(not torch.equal(y_moved, want[0]), "a parameter changed in place changes the output")
    with torch.no_grad():
        saved = mem.keys[0, 0].item()
        mem.keys[0, 0] = float("nan")
        expect_error(RuntimeError, "parameter 'keys' holds nan", lambda: mem(xs[0]),
                     "a NaN written in place after the state's check")
        mem.keys[0, 0] = saved
        check(torch.equal(mem(xs[0]), want[0]), "and the repaired parameter gives the first bits")
        other = copy.deepcopy(mem)
        check(torch.equal(other(xs[1]), want[1]), "a deep copy runs with a state of its own")
    results = [None] * 4

    def call(i):
        with torch.no_grad():
            results[i] = mem(xs[1])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check(all(torch.equal(r, want[1]) for r in results), "four threads sharing the module get the same bits")
    # Under autocast the inference calls keep the weights packed in bf16 between calls: an
    # in-place change (a version bump) makes them packed again, so the output is a fresh
    # module's with the changed weights.
    x = torch.randn(3, 16)
    w1 = mem.swilu_projection.weight
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = mem(x)
        w1.mul_(-1.5)
        after = mem(x)
        fresh = copy.deepcopy(mem)(x)
        w1.div_(-1.5)
    check(not torch.equal(before, after), "autocast inference: a weight changed in place changes the output")
    check(torch.equal(after, fresh), "autocast inference: the changed weights are packed again (a fresh module's bits)")


def test_score_compute():
    """score_compute="BF16" (MemoryConfig::score_compute) reaches the layer: the module's bits are
    the operator's with score_compute="BF16", different from the fp32 scores' and close to them,
    under autocast and in fp32 products; differentiable; copied by QuantizedHashingMemory;
    another value refused by the module and by the operator."""
    torch.manual_seed(9)
    with open("/proc/cpuinfo") as f:
        if "avx512_bf16" not in f.read():
            os.environ["PKM_BF16_KERNEL"] = "portable"
    args = dict(input_dim=64, heads=2, n_keys=32, k_dim=32, knn=16, v_dim=48, output_dim=64)
    _, mem = pair(args)
    x = torch.randn(40, args["input_dim"])
    q = mem.query_proj.query_mlps[0]
    ops = (mem.keys, q.weight, q.bias, mem.swilu_projection.weight, mem.swilu_projection.bias,
           mem.value_proj.weight, mem.value_proj.bias, None, None, mem.values.weight,
           args["heads"], args["knn"], False, None, True, None)
    with torch.no_grad():
        exact = [torch.ops.pkm.memory(x, *ops, c, None, "softmax", "F32") for c in ("F32", "BF16")]
        bf16 = [torch.ops.pkm.memory(x, *ops, c, None, "softmax", "BF16") for c in ("F32", "BF16")]
        mem.score_compute = "BF16"
        y_mod = mem(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_ac = mem(x)
    check(torch.equal(y_mod, bf16[0]), "score_compute='BF16': the module gives the operator's bits")
    check(torch.equal(y_ac, bf16[1]), "score_compute='BF16' under autocast: compute='BF16''s bits")
    for e, b, what in ((exact[0], bf16[0], "fp32 products"), (exact[1], bf16[1], "bf16 products")):
        check(not torch.equal(e, b) and rel(b, e) < 5e-2,
              "bf16 scores with %s: close to the fp32 scores' output, not equal (%.3g)" % (what, rel(b, e)))
    xr = x.clone().requires_grad_()
    mem(xr).sum().backward()
    g_bf16 = xr.grad.clone()
    xr.grad = None
    torch.ops.pkm.memory(xr, *ops, "F32", None, "softmax", "F32").sum().backward()
    check(torch.isfinite(g_bf16).all() and rel(g_bf16, xr.grad) < 0.15,
          "bf16 scores: dx close to the fp32 scores' (%.3g)" % rel(g_bf16, xr.grad))
    check(pkm_torch.QuantizedHashingMemory(mem, "int8").score_compute == "BF16",
          "QuantizedHashingMemory copies score_compute")
    expect_error(ValueError, "score_compute = 'F16' is not supported",
                 lambda: torch.ops.pkm.memory(x, *ops, "F32", None, "softmax", "F16"), "op score_compute='F16'")
    expect_error(ValueError, "score_compute = 'fp16' is not supported",
                 lambda: pkm_torch.HashingMemory(16, 16, n_keys=8, k_dim=8, knn=4, score_compute="fp16"),
                 "module score_compute='fp16'")


def main():
    pkm_torch.load_library(sys.argv[1] if len(sys.argv) > 1 else None)
    torch.set_num_threads(2)
    for t in (test_against_reference, test_btc_and_bf16, test_gradcheck, test_sparse_adam_and_fused,
              test_shared_values, test_bad_input, test_full_shapes, test_fused_twice_in_one_loss,
              test_gradient_accumulation, test_autocast_bf16, test_quantized_serving, test_inference_state,
              test_relu_activation, test_score_compute):
        t()
    test_state_pickle_and_names(sys.argv[3] if len(sys.argv) > 3 else "/tmp/pkm_torch_test")
    if len(sys.argv) > 3:
        test_train_then_load_in_cpp(sys.argv[2], sys.argv[3])
    print("%d failed" % len(FAILS))
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
