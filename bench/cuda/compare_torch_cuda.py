#!/usr/bin/env python3
"""PyTorch's torch.nn.functional.embedding_bag on the GPU, at bench_cuda's shapes: fp32 and
bf16 tables of 4 GiB, v_dim 256 / 1024 / 4096, bags of 4 x 32 uniformly random slots with
per-sample weights (mode 'sum'), forward and forward + backward of the table (sparse=False).
The same device-to-device copy as the limit. Prints a markdown table; writes JSON to the path
given. Exits 77 (skipped) where PyTorch has no CUDA device.

  python3 bench/cuda/compare_torch_cuda.py [torch.json]
"""
import json
import sys


def main():
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("compare_torch_cuda: skipped, PyTorch is not installed")
        return 77
    if not torch.cuda.is_available():
        print("compare_torch_cuda: skipped, PyTorch sees no CUDA device")
        return 77
    dev = torch.device("cuda")

    def median_ms(fn, reps=10):
        for _ in range(2):
            fn()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        times.sort()
        return times[len(times) // 2]

    table_bytes = 4 << 30
    src = torch.empty(table_bytes, dtype=torch.uint8, device=dev)
    dst = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    copy_ms = median_ms(lambda: dst.copy_(src[: 1 << 30]), 20)
    copy_gbs = 2 * (1 << 30) / (copy_ms * 1e-3) / 1e9
    print(f"device: {torch.cuda.get_device_name()}; device-to-device copy {copy_gbs:.0f} GB/s (read + written)\n")
    heads, knn = 4, 32
    bag = heads * knn
    results = []
    print("| table | v_dim | tokens | forward GB/s | forward / copy | fwd+bwd ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        esize = torch.tensor([], dtype=dtype).element_size()
        for dim in (256, 1024, 4096):
            rows = table_bytes // (dim * esize)
            tokens = max(1024, (2 << 30) // (bag * dim * esize))
            weight = src.view(dtype)[: rows * dim].view(rows, dim)
            weight.fill_(0.01)
            idx = torch.randint(0, rows, (tokens, bag), device=dev)
            w = torch.full((tokens, bag), 1.0 / bag, device=dev, dtype=dtype)
            fwd_ms = median_ms(lambda: F.embedding_bag(idx, weight, mode="sum", per_sample_weights=w))
            read = tokens * bag * dim * esize
            gbs = read / (fwd_ms * 1e-3) / 1e9
            param = torch.nn.Parameter(weight)
            dy = torch.ones(tokens, dim, device=dev, dtype=dtype)

            def fwd_bwd():
                param.grad = None
                F.embedding_bag(idx, param, mode="sum", per_sample_weights=w).backward(dy)

            try:
                fb_ms = median_ms(fwd_bwd, 3)
            except RuntimeError as e:  # out of memory for a dense 4 GiB gradient, say
                fb_ms = float("nan")
                print(f"  (backward failed: {e})", file=sys.stderr)
            del param
            torch.cuda.empty_cache()
            results.append({"dtype": name, "dim": dim, "tokens": tokens, "forward_gbs": gbs, "fwd_bwd_ms": fb_ms})
            print(f"| {name} | {dim} | {tokens} | {gbs:.0f} | {100 * gbs / copy_gbs:.0f} % | {fb_ms:.2f} |")
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_gbs": copy_gbs, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
