"""pkm's memory layer inside PyTorch: a drop-in for the reference ``HashingMemory``.

``HashingMemory`` has the reference module's constructor knobs and parameter names
(``keys``, ``values.weight``, ``query_proj.query_mlps.0.*``, ``swilu_projection.*``,
``value_proj.*``, ``gating.*``), so a reference checkpoint loads with
``load_state_dict(strict=True)``. Its forward and backward are pkm's C++ kernels
(``torch.ops.pkm.memory``) on the tensors' own memory; autograd fills every ``.grad``.
The value table's gradient is a sparse COO tensor by default (``torch.optim.SparseAdam``
steps it), dense with ``sparse=False``, or not formed at all in the fused mode, where
``mem.fused_optimizer(...)`` returns pkm's lazy Adam / row-wise Adagrad, which updates the
table inside backward.

The C++ library is built by the README's build (``build/python/libpkm_torch_ops.so``, CMake
target ``pkm_torch_ops``). ``load_library()`` finds it there, or takes a path, or
``$PKM_TORCH_LIBRARY``.

    import pkm_torch
    pkm_torch.load_library()
    block.ffn = pkm_torch.HashingMemory(input_dim=1024, output_dim=1024, mem_n_keys=512)
"""
import math
import os

import torch

_loaded = None


def load_library(path=None):
    """Loads pkm's operator library once (path, $PKM_TORCH_LIBRARY, or the repository's build/)."""
    global _loaded
    if _loaded is not None:
        return _loaded
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [path, os.environ.get("PKM_TORCH_LIBRARY"),
                  os.path.join(here, "..", "build", "python", "libpkm_torch_ops.so")]
    for c in candidates:
        if c and os.path.exists(c):
            torch.ops.load_library(c)
            _loaded = c
            return c
    raise FileNotFoundError("pkm_torch: libpkm_torch_ops.so not found (tried %s); build it with the README's build "
                            "command (CMake target pkm_torch_ops) or set PKM_TORCH_LIBRARY" %
                            ", ".join(c for c in candidates if c))


class ValueOptimizer:
    """pkm's sparse optimizer for one value table, applied inside backward (the fused mode).

    kind: "adam" (lazy Adam: per-row step counts) or "adagrad" (row-wise Adagrad, FBGEMM's
    rule). The update happens during ``loss.backward()``; ``step()`` and ``zero_grad()`` exist
    so it sits beside the other optimizers in a training loop (``step()`` returns the value
    gradient's norm before clipping, of the last backward).
    """

    def __init__(self, table, kind="adagrad", lr=1e-2, max_grad_norm=0.0, weight_decay=0.0,
                 betas=(0.9, 0.999), eps=1e-8):
        load_library()
        rows, dim = table.shape
        self.table = table
        self.impl = torch.classes.pkm.ValueOptimizer(kind, rows, dim, float(lr), float(max_grad_norm),
                                                     float(weight_decay), float(betas[0]), float(betas[1]),
                                                     float(eps))
        self.lr = lr

    def set_lr(self, lr):
        self.impl.set_lr(float(lr))
        self.lr = lr

    def steps(self):
        return self.impl.steps()

    def step(self):
        return self.impl.last_norm()

    def zero_grad(self, set_to_none=True):
        pass


class _QueryProj(torch.nn.Module):
    def __init__(self, input_dim, out_dim, bias):
        super().__init__()
        self.query_mlps = torch.nn.Sequential(torch.nn.Linear(input_dim, out_dim, bias=bias))


class HashingMemory(torch.nn.Module):
    """A product-key memory layer computed by pkm: (B, T, C) or (N, C) in, same leading shape out.

    Knobs as the reference: input_dim, output_dim, mem_n_keys, mem_heads, mem_knn, mem_k_dim,
    mem_v_dim (-1: output_dim), swilu_projection (Memory+), value_projection, gating (the
    sigmoid gate), query_bias, qk_norm / qk_norm_scale. values: an ``nn.Embedding`` to share
    with other layers (its rows must be mem_n_keys**2). sparse: the table's gradient as a
    sparse COO tensor (for ``torch.optim.SparseAdam``). values_dtype: torch.float32 or
    torch.bfloat16 (a bf16 table with float32 parameters).
    """

    def __init__(self, input_dim, output_dim, mem_n_keys, mem_heads=4, mem_knn=32, mem_k_dim=512,
                 mem_v_dim=-1, swilu_projection=True, value_projection=True, gating=False, query_bias=True,
                 qk_norm=False, qk_norm_scale=None, values=None, sparse=True, values_dtype=torch.float32):
        super().__init__()
        load_library()
        v_dim = output_dim if mem_v_dim is None or mem_v_dim < 0 else mem_v_dim
        if swilu_projection and not value_projection:
            raise ValueError("HashingMemory: swilu_projection needs value_projection")
        self.heads, self.knn, self.k_dim, self.n_keys = mem_heads, mem_knn, mem_k_dim, mem_n_keys
        self.qk_norm = qk_norm
        self.qk_norm_scale = qk_norm_scale
        self.sparse = sparse
        self._fused = None
        bound = 1 / math.sqrt(mem_k_dim)
        self.keys = torch.nn.Parameter(torch.empty(2 * mem_heads * mem_n_keys, mem_k_dim // 2).uniform_(-bound, bound))
        if values is None:
            values = torch.nn.Embedding(mem_n_keys * mem_n_keys, v_dim, sparse=sparse)
            torch.nn.init.normal_(values.weight, std=v_dim ** -0.5)
            if values_dtype != torch.float32:
                values.weight.data = values.weight.data.to(values_dtype)
        elif values.weight.shape != (mem_n_keys * mem_n_keys, v_dim):
            raise ValueError("HashingMemory: the shared values are %s, expected (%d, %d)" %
                             (tuple(values.weight.shape), mem_n_keys * mem_n_keys, v_dim))
        self.values = values
        self.query_proj = _QueryProj(input_dim, mem_heads * mem_k_dim, query_bias)
        if swilu_projection:
            self.swilu_projection = torch.nn.Linear(input_dim, v_dim)
        if value_projection:
            self.value_proj = torch.nn.Linear(v_dim, output_dim)
        if gating:
            self.gating = torch.nn.Linear(input_dim, 1)

    def fused_optimizer(self, kind="adagrad", lr=1e-2, **options):
        """Switches to the fused mode: returns pkm's optimizer for the table, which updates it
        inside backward. The table then gets no gradient (its requires_grad is turned off)."""
        self._fused = ValueOptimizer(self.values.weight, kind=kind, lr=lr, **options)
        self.values.weight.requires_grad_(False)
        return self._fused

    def forward(self, x):
        def get(name, attr):
            m = getattr(self, name, None)
            return None if m is None or isinstance(m, bool) else getattr(m, attr)
        q = self.query_proj.query_mlps[0]
        scale = 0.0 if self.qk_norm_scale is None else float(self.qk_norm_scale)
        return torch.ops.pkm.memory(
            x, self.keys, q.weight, q.bias, get("swilu_projection", "weight"), get("swilu_projection", "bias"),
            get("value_proj", "weight"), get("value_proj", "bias"), get("gating", "weight"), get("gating", "bias"),
            self.values.weight, self.heads, self.knn, self.qk_norm, scale, self.sparse,
            None if self._fused is None else self._fused.impl)
