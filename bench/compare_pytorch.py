#!/usr/bin/env python3
"""pkm against PyTorch on the same CPU, in one invocation.

Runs pkm_bench's layer, gather and GEMM benchmarks, then the same work in plain PyTorch (the
memory layer of tests/reference/make_golden.py at the same shapes, F.embedding_bag, and
torch.matmul), and prints tokens/s (or rows/s, FLOP/s) for both and the ratio.

  /usr/bin/python3 bench/compare_pytorch.py [--pkm-bench build/bench/pkm_bench]
        [--threads 2] [--repetitions 3] [--json results.json]
  /usr/bin/python3 bench/compare_pytorch.py --latency [--threads 2] [--calls 1000]

--latency: a decoding model's forward instead, one call of 1, 8 or 64 tokens at a time:
pkm_bench's BM_DecodeLatency (fp32 table) against the reference module in eval() under
no_grad(), in fp32 and under bf16 autocast, each call timed on its own, median and 99th
percentile in microseconds.

Needs Debian's python3-torch (and libopenblas0-pthread for a fast torch GEMM). The shapes are
pkm_bench's: d 1024, 4 heads, knn 32, k_dim 512, 512^2 slots x 1024 values (a 1 GiB table),
2048 tokens; the gather reads 4096 bags of 4 x 32 random rows of a 1 GiB table.

PyTorch's layer backward is timed twice: with the dense value gradient the reference module
gets from F.embedding_bag (a 1 GiB zero-filled gradient each step), and with sparse=True (a
sparse COO gradient). The faster of the two is the peer.
"""
import argparse
import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import types

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    print("PyTorch is not installed (Debian: apt-get install python3-torch)", file=sys.stderr)
    sys.exit(77)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = dict(input_dim=1024, heads=4, n_keys=512, k_dim=512, knn=32, v_dim=1024, output_dim=1024)
BATCH = 2048


def load_reference():
    spec = importlib.util.spec_from_file_location(
        "make_golden", os.path.join(ROOT, "tests", "reference", "make_golden.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def median_time(fn, reps, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_pkm(bench, reps):
    filt = ("^(BM_StreamRead|BM_Gemm/.*|BM_LayerGemm/.*|BM_EmbeddingBag/fp32/1024|"
            "BM_LayerForward|BM_LayerForwardBackward|BM_LayerForwardBf16|BM_LayerForwardBackwardBf16|"
            "BM_LayerForwardBf16Scores|BM_LayerForwardBackwardBf16Scores)"
            "/real_time$")
    cmd = [bench, "--benchmark_filter=" + filt, "--benchmark_format=json",
           "--benchmark_repetitions=%d" % reps, "--benchmark_report_aggregates_only=true",
           "--benchmark_min_time=0.3"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    res = {}
    for b in json.loads(out)["benchmarks"]:
        if b.get("aggregate_name") != "median":
            continue
        name = b["run_name"].replace("/real_time", "")
        res[name] = b
    return res


def torch_layer(ref, reps, sparse, autocast=False):
    torch.manual_seed(0)
    m = ref.Memory(**CONFIG)
    x = torch.randn(BATCH, CONFIG["input_dim"])
    dout = torch.full((BATCH, CONFIG["output_dim"]), 1e-3)
    saved = ref.F
    if sparse:
        ref.F = types.SimpleNamespace(embedding_bag=functools.partial(F.embedding_bag, sparse=True),
                                      softmax=F.softmax, silu=F.silu)
    try:
        def fwd():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                m(x)

        def fwd_bwd():
            for p in m.parameters():
                p.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out, _, _ = m(x)
            out.float().backward(dout)

        t_fwd = median_time(fwd, reps) if not sparse else None
        t_fb = median_time(fwd_bwd, reps)
    finally:
        ref.F = saved
    return t_fwd, t_fb


def torch_gather(reps):
    rows, dim, bags, bag = 262144, 1024, 4096, 128
    table = torch.empty(rows, dim).normal_()
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, rows, (bags, bag), generator=g)
    w = torch.full((bags, bag), 1.0 / 32)

    def run():
        F.embedding_bag(idx, table, mode="sum", per_sample_weights=w)

    return median_time(run, reps, warmup=2), bags * bag


def torch_gemm(reps, dtype=torch.float32):
    """torch.matmul at the layer's largest product; dtype bfloat16: bf16 tensors (converted
    before timing, fp32 accumulation inside oneDNN), the best library bf16 GEMM here."""
    a = torch.randn(2048, 1024).to(dtype)
    b = torch.randn(2048, 1024).to(dtype)
    return median_time(lambda: a @ b.T, reps * 3, warmup=2), 2.0 * 2048 * 1024 * 2048


def percentiles(times_s):
    t = sorted(times_s)
    return t[len(t) // 2] * 1e6, t[min(len(t) - 1, len(t) * 99 // 100)] * 1e6


def torch_latency(ref, batch, calls, autocast=False):
    torch.manual_seed(0)
    m = ref.Memory(**CONFIG).eval()
    xs = [torch.randn(batch, CONFIG["input_dim"]) for _ in range(64)]
    times = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for i in range(10):
            m(xs[i % 64])
        for i in range(calls):
            t0 = time.perf_counter()
            m(xs[i % 64])
            times.append(time.perf_counter() - t0)
    return percentiles(times)


def latency(args):
    # pkm's fp32 layer, and the same layer with its products in bf16 (its weights packed once).
    filt = "^BM_DecodeLatency<(float|float_bf16_products)>/batch:[0-9]+/threads:%d/real_time$" % args.threads
    cmd = [args.pkm_bench, "--benchmark_filter=" + filt, "--benchmark_format=json",
           "--benchmark_min_time=2"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    pkm, pkm_bf16 = {}, {}
    for b in json.loads(out)["benchmarks"]:
        batch = int(b["run_name"].split("batch:")[1].split("/")[0])
        (pkm_bf16 if "float_bf16_products" in b["run_name"] else pkm)[batch] = b
    ref = load_reference()
    print("PyTorch %s, %d threads; pkm_bench %s" % (torch.__version__, torch.get_num_threads(),
                                                   args.pkm_bench))
    print()
    print("| batch | pkm p50 | pkm p99 | limit | PyTorch p50 | PyTorch p99 | PyTorch / pkm (p50) "
          "| PyTorch bf16 autocast p50 | autocast / pkm (p50) | pkm bf16 products p50 | autocast / pkm bf16 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for batch in sorted(pkm):
        calls = max(100, args.calls // batch)
        t50, t99 = torch_latency(ref, batch, calls)
        a50, _ = torch_latency(ref, batch, calls, autocast=True)
        b, h = pkm[batch], pkm_bf16[batch]
        rows.append(dict(batch=batch, pkm_p50_us=b["p50_us"], pkm_p99_us=b["p99_us"],
                         limit_us=b["limit_us"], torch_p50_us=t50, torch_p99_us=t99,
                         torch_autocast_p50_us=a50, torch_calls=calls, pkm_calls=b["calls"],
                         pkm_bf16_p50_us=h["p50_us"], pkm_bf16_p99_us=h["p99_us"]))
        print("| %d | %.0f µs | %.0f µs | %.0f µs | %.0f µs | %.0f µs | **%.2f×** | %.0f µs | **%.2f×** | %.0f µs | "
              "**%.2f×** |"
              % (batch, b["p50_us"], b["p99_us"], b["limit_us"], t50, t99, t50 / b["p50_us"],
                 a50, a50 / b["p50_us"], h["p50_us"], a50 / h["p50_us"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pkm-bench", default=os.path.join(ROOT, "build", "bench", "pkm_bench"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--json", help="write all numbers to this file")
    ap.add_argument("--latency", action="store_true", help="the decoding latency comparison")
    ap.add_argument("--calls", type=int, default=1000, help="--latency: PyTorch calls at batch 1")
    args = ap.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    if args.latency:
        return latency(args)
    print("pkm_bench: %s (OMP_NUM_THREADS=%s)" % (args.pkm_bench, os.environ["OMP_NUM_THREADS"]))
    pkm = run_pkm(args.pkm_bench, args.repetitions)
    ref = load_reference()
    print("PyTorch %s, %d threads" % (torch.__version__, torch.get_num_threads()))
    t_fwd, t_fb_dense = torch_layer(ref, args.repetitions, sparse=False)
    _, t_fb_sparse = torch_layer(ref, args.repetitions, sparse=True)
    t_fwd_ac, t_fb_ac_dense = torch_layer(ref, args.repetitions, sparse=False, autocast=True)
    _, t_fb_ac_sparse = torch_layer(ref, args.repetitions, sparse=True, autocast=True)
    t_gather, gather_rows = torch_gather(args.repetitions)
    t_gemm, gemm_flop = torch_gemm(args.repetitions)
    t_gemm_bf16, _ = torch_gemm(args.repetitions, torch.bfloat16)

    def pkm_seconds(name):
        b = pkm[name]
        scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b["time_unit"]]
        return b["real_time"] * scale

    rows = []
    t_fb = min(t_fb_dense, t_fb_sparse)
    for what, pk, pt, unit, n in [
            ("layer forward", "BM_LayerForward", t_fwd, "tokens/s", BATCH),
            ("layer forward+backward", "BM_LayerForwardBackward", t_fb, "tokens/s", BATCH),
            ("embedding bag fp32, v_dim 1024", "BM_EmbeddingBag/fp32/1024", t_gather, "rows/s", gather_rows)]:
        a, b = n / pkm_seconds(pk), n / pt
        rows.append((what, a, b, unit))
    print()
    print("| work | pkm | PyTorch | pkm / PyTorch |")
    print("|---|---|---|---|")
    for what, a, b, unit in rows:
        print("| %s | %.4g %s | %.4g %s | **%.2f×** |" % (what, a, unit, b, unit, a / b))
    print()
    print("PyTorch forward+backward: dense value gradient %.1f ms, sparse %.1f ms (peer: the faster)"
          % (t_fb_dense * 1e3, t_fb_sparse * 1e3))
    t_fb_ac = min(t_fb_ac_dense, t_fb_ac_sparse)
    if "BM_LayerForwardBf16" in pkm:
        print()
        print("bf16 products: pkm with MemoryConfig::compute = BF16, PyTorch under "
              "torch.autocast(\"cpu\", dtype=torch.bfloat16); tokens/s")
        print()
        print("| work | pkm fp32 | pkm bf16 | pkm bf16 + bf16 scores | PyTorch fp32 | PyTorch autocast "
              "| pkm bf16 / autocast | pkm bf16 + bf16 scores / autocast | pkm fp32 / autocast "
              "| pkm bf16 / pkm fp32 |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for what, p32, p16, t32, t16 in [
                ("layer forward", "BM_LayerForward", "BM_LayerForwardBf16", t_fwd, t_fwd_ac),
                ("layer forward+backward", "BM_LayerForwardBackward", "BM_LayerForwardBackwardBf16",
                 t_fb, t_fb_ac)]:
            a32, a16 = BATCH / pkm_seconds(p32), BATCH / pkm_seconds(p16)
            a16s = BATCH / pkm_seconds(p16 + "Scores") if p16 + "Scores" in pkm else float("nan")
            b32, b16 = BATCH / t32, BATCH / t16
            print("| %s | %.4g | %.4g | %.4g | %.4g | %.4g | **%.2f×** | **%.2f×** | %.2f× | %.2f× |"
                  % (what, a32, a16, a16s, b32, b16, a16 / b16, a16s / b16, a32 / b16, a16 / a32))
        print("(bf16 scores: MemoryConfig::score_compute = BF16, the key search's half scores from "
              "bf16 operands as autocast computes them; pkm bf16 keeps them fp32)")
        print()
    print("GEMM 2048 x 1024 x 2048: torch.matmul %.1f GFLOP/s, on bf16 tensors %.1f GFLOP/s"
          % (gemm_flop / t_gemm / 1e9, gemm_flop / t_gemm_bf16 / 1e9))
    for name in sorted(pkm):
        if name.startswith("BM_Gemm") or name.startswith("BM_LayerGemm"):
            print("  %s: %.1f GFLOP/s" % (name, pkm[name]["FLOP/s"] / 1e9))
    if "BM_StreamRead" in pkm:
        print("BM_StreamRead: %.1f GB/s" % (pkm["BM_StreamRead"]["bytes_per_second"] / 1e9))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pkm": pkm, "torch": {"forward_s": t_fwd, "forward_backward_dense_s": t_fb_dense,
                                             "forward_backward_sparse_s": t_fb_sparse,
                                             "forward_autocast_s": t_fwd_ac,
                                             "forward_backward_autocast_dense_s": t_fb_ac_dense,
                                             "forward_backward_autocast_sparse_s": t_fb_ac_sparse,
                                             "embedding_bag_s": t_gather, "gemm_s": t_gemm,
                                             "gemm_bf16_s": t_gemm_bf16},
                       "table": rows}, f, indent=1)


if __name__ == "__main__":
    main()
