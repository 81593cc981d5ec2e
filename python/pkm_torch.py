"""pkm's memory layer inside PyTorch: a drop-in for the reference ``HashingMemory``.

``HashingMemory`` takes the reference module's constructor arguments (``lingua/product_key/
memory.py`` of facebookresearch/memory, the code of "Memory Layers at Scale") and has its
parameter names (``keys``, ``values.weight``, ``query_proj.query_mlps.0.*``,
``swilu_projection.*``, ``value_proj.*``, ``gating.*``), so a reference checkpoint loads with
``load_state_dict(strict=True)``. Its forward and backward are pkm's C++ kernels
(``torch.ops.pkm.memory``) on the tensors' own memory; autograd fills every ``.grad``.

The value table's gradient is dense by default (any torch optimizer, ``AdamW`` included,
takes it), a sparse COO tensor with ``sparse=True`` (for ``torch.optim.SparseAdam``), or not
formed at all in the fused mode, where ``mem.fused_optimizer(...)`` returns pkm's lazy Adam /
row-wise Adagrad, which updates the table inside backward.

The C++ library is built by the README's build (``build/python/libpkm_torch_ops.so``, CMake
target ``pkm_torch_ops``). It is loaded when the first module is made or unpickled;
``load_library()`` takes a path, or ``$PKM_TORCH_LIBRARY``.

    import pkm_torch
    block.ffn = pkm_torch.HashingMemory(input_dim=1024, output_dim=1024, mem_n_keys=512)
"""
import math
import os
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

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


# ---- the one table of names ------------------------------------------------------------------
# The layer's settings under pkm's names (the fields of pkm::MemoryConfig) with this module's
# defaults: the reference module's, so that a drop-in behaves as the reference does (pkm's C++
# MemoryConfig defaults heads to 1; here it is the reference's 4).
DEFAULTS = dict(n_keys=1024, heads=4, knn=32, k_dim=512, v_dim=-1, memory_plus=True, value_projection=None,
                gating=False, query_bias=True, qk_norm=False, qk_norm_scale=None, score_activation="softmax")
# The reference HashingMemory's arguments that set those settings: reference name -> pkm name.
REFERENCE_NAMES = {
    "mem_n_keys": "n_keys",
    "mem_heads": "heads",
    "mem_knn": "knn",
    "mem_k_dim": "k_dim",
    "mem_v_dim": "v_dim",          # -1: output_dim
    "swilu_projection": "memory_plus",
    "mem_gated": "gating",
    "mem_query_bias": "query_bias",
}
# value_projection unset follows the reference: a projection when mem_v_dim > 0 or with Memory+.
# The reference's other arguments, and what they do here:
#   value_fixed_lr      as in the reference: values.weight.fixed_lr (and pk_value_param) for a
#                       training loop that reads it; the fused optimizer's default lr.
#   mem_share_values    True: every HashingMemory made with it shares one table (the class's
#                       VALUES, reset_shared_state() forgets it), as in the reference. pkm's
#                       default is False (the reference's is True): pass values= or True.
#   mem_input_dropout   dropout on x, as the reference (before the query, Memory+ and the gate).
#   mem_value_dropout   dropout on the output, as the reference.
#   mem_query_dropout   not supported (the query is formed inside pkm's kernel): 0 only.
#   mem_query_batchnorm not supported: False only.
#   peer_variant        not supported (the PEER layer is another layer): False only.
REFERENCE_VERSION = "facebookresearch/memory, lingua/product_key/memory.py (HashingMemory, 2024-12)"


def _settings(output_dim, kwargs):
    """pkm's settings from the constructor's keyword arguments (pkm's or the reference's names)."""
    s = dict(DEFAULTS)
    given = {}
    for name, value in kwargs.items():
        key = REFERENCE_NAMES.get(name, name)
        if key not in DEFAULTS:
            raise TypeError("HashingMemory: unknown argument '%s'; expected one of %s, or the reference's %s" %
                            (name, ", ".join(DEFAULTS), ", ".join(REFERENCE_NAMES)))
        if key in given:
            raise TypeError("HashingMemory: '%s' and '%s' both set %s; give one" % (given[key], name, key))
        given[key] = name
        s[key] = value
    explicit_v_dim = s["v_dim"] is not None and s["v_dim"] > 0
    s["v_dim"] = s["v_dim"] if explicit_v_dim else output_dim
    if s["value_projection"] is None:
        s["value_projection"] = bool(explicit_v_dim or s["memory_plus"])
    return s


class ValueOptimizer:
    """pkm's sparse optimizer for one value table, applied inside backward (the fused mode).

    kind: "adam" (lazy Adam: per-row step counts) or "adagrad" (row-wise Adagrad, FBGEMM's
    rule). The table's gradient is never formed: each backward hands pkm the touched rows.
    The update waits until every graph alive that read the table has run its backward (a layer
    called twice in one loss steps once, from both gradients, each taken against the table as
    its forward saw it) and happens at the latest at the next forward or ``step()``.
    accumulate=True: backwards only add their rows (gradient accumulation over micro-batches;
    pkm sums the touched rows itself) and ``step()`` applies them; ``zero_grad()`` drops them.
    ``step()`` returns the value gradient's norm before clipping, of the last step taken.
    """

    def __init__(self, table, kind="adagrad", lr=1e-2, max_grad_norm=0.0, weight_decay=0.0,
                 betas=(0.9, 0.999), eps=1e-8, accumulate=False):
        load_library()
        rows, dim = table.shape
        self.table = table
        self.impl = torch.classes.pkm.ValueOptimizer(kind, rows, dim, float(lr), float(max_grad_norm),
                                                     float(weight_decay), float(betas[0]), float(betas[1]),
                                                     float(eps), bool(accumulate))
        self.lr = lr

    def set_lr(self, lr):
        self.impl.set_lr(float(lr))
        self.lr = lr

    def steps(self):
        return self.impl.steps()

    def pending_rows(self):
        """Rows of the gradient accumulated and not yet applied."""
        return self.impl.pending_rows()

    def step(self):
        return self.impl.step(self.table.data)

    def zero_grad(self, set_to_none=True):
        if self.impl.accumulates():
            self.impl.zero_grad()

    def state_dict(self):
        """The optimizer's state tensors and settings (what load_state_dict takes)."""
        kinds = {"adam": 0.0, "adagrad": 1.0}
        config = torch.tensor([kinds[self.impl.kind()]] + list(self.impl.options()) +
                              [1.0 if self.impl.accumulates() else 0.0], dtype=torch.float64)
        out = {"config": config}
        out.update(dict(self.impl.state().items()))
        return out

    def load_state_dict(self, state):
        """Loads state_dict() of an optimizer of the same kind and table (checked by pkm before
        anything changes); the settings (lr, ...) come with it."""
        state = dict(state)
        config = state.pop("config", None)
        if config is not None:
            c = config.tolist()
            kind = {0.0: "adam", 1.0: "adagrad"}.get(c[0])
            if kind != self.impl.kind() or len(c) != 8:
                raise ValueError("pkm ValueOptimizer.load_state_dict: the state is of a '%s' optimizer, this one is '%s'" %
                                 (kind, self.impl.kind()))
            rows, dim = self.table.shape
            impl = torch.classes.pkm.ValueOptimizer(kind, rows, dim, *[float(v) for v in c[1:7]], bool(c[7]))
        else:
            impl = self.impl
        impl.load_state(state)
        self.impl = impl
        self.lr = self.impl.options()[0]

    def __getstate__(self):
        return {"table": self.table, "lr": self.lr, "kind": self.impl.kind(), "options": list(self.impl.options()),
                "accumulate": self.impl.accumulates(), "state": dict(self.impl.state().items())}

    def __setstate__(self, d):
        load_library()
        self.table, self.lr = d["table"], d["lr"]
        rows, dim = self.table.shape
        self.impl = torch.classes.pkm.ValueOptimizer(d["kind"], rows, dim, *[float(v) for v in d["options"]],
                                                     bool(d["accumulate"]))
        self.impl.load_state(d["state"])


class _QueryProj(torch.nn.Module):
    def __init__(self, input_dim, out_dim, bias):
        super().__init__()
        self.query_mlps = torch.nn.Sequential(torch.nn.Linear(input_dim, out_dim, bias=bias))


_FUSED_PREFIX = "fused_optimizer."


class HashingMemory(torch.nn.Module):
    """A product-key memory layer computed by pkm: (B, T, C) or (N, C) in, same leading shape out.

    Arguments (keyword only after input_dim, output_dim), under pkm's names or the reference's
    (the table above, REFERENCE_NAMES): n_keys / mem_n_keys, heads / mem_heads, knn / mem_knn,
    k_dim / mem_k_dim, v_dim / mem_v_dim (-1: output_dim), memory_plus / swilu_projection,
    value_projection, gating / mem_gated, query_bias / mem_query_bias, qk_norm, qk_norm_scale,
    score_activation ("softmax", the reference's, or "relu": ReLU of the selected scores, no
    normalisation, as Csordas et al. 2023 use for product-key memories);
    score_compute ("F32": each key score the fp32 dot product of its query half and sub-key; or
    "BF16": from bf16-rounded operands with fp32 sums, as autocast computes the reference's);
    and the reference's value_fixed_lr, mem_share_values and dropouts. values: an
    ``nn.Embedding`` to share with other layers (its rows must be n_keys**2). sparse: the
    table's gradient as a sparse COO tensor (for ``torch.optim.SparseAdam``); dense by default.
    values_dtype: torch.float32 or torch.bfloat16 (a bf16 table with float32 parameters).
    Every setting is checked by pkm's C++ config check at construction.
    """

    VALUES = None  # the table made with mem_share_values=True, as the reference's class keeps it

    @classmethod
    def reset_shared_state(cls):
        """Forgets the table shared through mem_share_values=True (as the reference's)."""
        cls.VALUES = None

    def __init__(self, input_dim, output_dim, *, values=None, sparse=False, values_dtype=torch.float32,
                 value_fixed_lr=0.001, mem_share_values=False, mem_input_dropout=0.0, mem_query_dropout=0.0,
                 mem_value_dropout=0.0, mem_query_batchnorm=False, peer_variant=False, score_compute="F32",
                 **kwargs):
        super().__init__()
        load_library()
        s = _settings(output_dim, kwargs)
        for name, value, why in (("mem_query_dropout", mem_query_dropout, "the query is formed inside pkm's kernel"),
                                 ("mem_query_batchnorm", mem_query_batchnorm, "pkm's query is one linear map"),
                                 ("peer_variant", peer_variant, "PEER is another layer")):
            if value:
                raise ValueError("HashingMemory: %s = %r is not supported (%s); expected %r" %
                                 (name, value, why, 0.0 if "dropout" in name else False))
        for name, p in (("mem_input_dropout", mem_input_dropout), ("mem_value_dropout", mem_value_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError("HashingMemory: %s = %r, expected 0 <= p < 1" % (name, p))
        torch.ops.pkm.check_config(input_dim, output_dim, s["n_keys"], s["heads"], s["knn"], s["k_dim"], s["v_dim"],
                                   s["memory_plus"], s["value_projection"], s["gating"], s["query_bias"],
                                   s["qk_norm"], None if s["qk_norm_scale"] is None else float(s["qk_norm_scale"]),
                                   str(s["score_activation"]))
        self.input_dim, self.output_dim = input_dim, output_dim
        self.heads, self.knn, self.k_dim, self.n_keys, self.v_dim = s["heads"], s["knn"], s["k_dim"], s["n_keys"], s["v_dim"]
        self.qk_norm = bool(s["qk_norm"])
        self.qk_norm_scale: Optional[float] = None if s["qk_norm_scale"] is None else float(s["qk_norm_scale"])
        self.score_activation = str(s["score_activation"])
        if score_compute not in ("F32", "BF16"):
            raise ValueError("HashingMemory: score_compute = %r is not supported; expected 'F32' or 'BF16'"
                             % (score_compute,))
        self.score_compute = str(score_compute)
        self.sparse = bool(sparse)
        self.input_dropout, self.value_dropout = float(mem_input_dropout), float(mem_value_dropout)
        self.value_fixed_lr = value_fixed_lr
        self.mem_share_values = mem_share_values
        self._fused = None
        self._fused_impl = None
        # Kept between inference calls (no_grad / inference_mode): the forward's buffers and the
        # parameters' finiteness check, redone only when a parameter tensor changes.
        self._state = torch.classes.pkm.ForwardState()
        self.keys = torch.nn.Parameter(torch.empty(2 * self.heads * self.n_keys, self.k_dim // 2))
        shape = (self.n_keys * self.n_keys, self.v_dim)
        if values is None and mem_share_values and HashingMemory.VALUES is not None:
            values = HashingMemory.VALUES
        self.original = values is None  # this module made its table (and initialises it)
        if values is None:
            values = torch.nn.Embedding(*shape, sparse=self.sparse)
            if values_dtype != torch.float32:
                values.weight.data = values.weight.data.to(values_dtype)
            if mem_share_values:
                HashingMemory.VALUES = values
        elif tuple(values.weight.shape) != shape:
            raise ValueError("HashingMemory: the shared values are %s, expected (%d, %d)" %
                             (tuple(values.weight.shape), shape[0], shape[1]))
        self.values = values
        self.query_proj = _QueryProj(input_dim, self.heads * self.k_dim, s["query_bias"])
        self.swilu_projection = torch.nn.Linear(input_dim, self.v_dim) if s["memory_plus"] else None
        self.value_proj = torch.nn.Linear(self.v_dim, output_dim) if s["value_projection"] else None
        self.gating = torch.nn.Linear(input_dim, 1) if s["gating"] else None
        self.reset_parameters()

    def reset_parameters(self, init_std=None, factor=1.0):
        """The reference initialisation: keys U(+-1/sqrt(k_dim)); values N(0, v_dim^-1/2) (when
        this module made its table); the query weight Xavier-uniform; Memory+ and output
        projections N(0, output_dim^-1/2); the gate N(0, input_dim^-1/2); biases 0. The table
        gets the reference's fixed_lr / pk_value_param attributes (value_fixed_lr).
        init_std and factor are accepted for the reference's signature and unused, as there."""
        with torch.no_grad():
            bound = 1 / math.sqrt(self.k_dim)
            self.keys.uniform_(-bound, bound)
            if self.original:
                self.values.weight.normal_(0.0, self.v_dim ** -0.5)
            q = self.query_proj.query_mlps[0]
            torch.nn.init.xavier_uniform_(q.weight)
            for layer, std in ((q, None), (self.swilu_projection, self.output_dim ** -0.5),
                               (self.value_proj, self.output_dim ** -0.5), (self.gating, self.input_dim ** -0.5)):
                if layer is None:
                    continue
                if std is not None:
                    layer.weight.normal_(0.0, std)
                if layer.bias is not None:
                    layer.bias.zero_()
        self.values.weight.fixed_lr = self.value_fixed_lr
        self.values.weight.pk_value_param = True

    def fused_optimizer(self, kind="adagrad", lr=None, accumulate=False, **options):
        """Switches to the fused mode: returns pkm's optimizer for the table, which updates it
        inside backward (see ValueOptimizer; lr defaults to value_fixed_lr). The table then
        gets no gradient (its requires_grad is turned off). Its state is part of state_dict()
        (under fused_optimizer.*) and of pickles."""
        lr = self.value_fixed_lr if lr is None else lr
        self._fused = ValueOptimizer(self.values.weight, kind=kind, lr=lr, accumulate=accumulate, **options)
        self._fused_impl = self._fused.impl
        self.values.weight.requires_grad_(False)
        return self._fused

    def forward(self, x):
        if self.input_dropout > 0.0:
            x = F.dropout(x, p=self.input_dropout, training=self.training)
        q = self.query_proj.query_mlps[0]
        w1: Optional[torch.Tensor] = None
        b1: Optional[torch.Tensor] = None
        w2: Optional[torch.Tensor] = None
        b2: Optional[torch.Tensor] = None
        wg: Optional[torch.Tensor] = None
        bg: Optional[torch.Tensor] = None
        if self.swilu_projection is not None:
            w1, b1 = self.swilu_projection.weight, self.swilu_projection.bias
        if self.value_proj is not None:
            w2, b2 = self.value_proj.weight, self.value_proj.bias
        if self.gating is not None:
            wg, bg = self.gating.weight, self.gating.bias
        y = torch.ops.pkm.memory(x, self.keys, q.weight, q.bias, w1, b1, w2, b2, wg, bg, self.values.weight,
                                 self.heads, self.knn, self.qk_norm, self.qk_norm_scale, self.sparse, self._fused_impl,
                                 "F32", self._state, self.score_activation, self.score_compute)
        if self.value_dropout > 0.0:
            y = F.dropout(y, p=self.value_dropout, training=self.training)
        return y

    # ---- the fused optimizer's state in state_dict, pickles made in one process loaded in another

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._fused is not None:
            for name, t in self._fused.state_dict().items():
                destination[prefix + _FUSED_PREFIX + name] = t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        mine = {k[len(prefix + _FUSED_PREFIX):]: state_dict.pop(k) for k in list(state_dict)
                if k.startswith(prefix + _FUSED_PREFIX)}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not mine:
            return  # a checkpoint without optimizer state (the reference's): the optimizer is kept
        if self._fused is None:  # unexpected (an error under strict): call fused_optimizer(...) first
            unexpected_keys.extend(prefix + _FUSED_PREFIX + k for k in mine)
            return
        try:
            self._fused.load_state_dict(mine)
            self._fused_impl = self._fused.impl
        except (ValueError, RuntimeError, IndexError) as e:
            error_msgs.append(str(e))

    def __setstate__(self, state):
        load_library()  # a model unpickled in a fresh process: pkm's ops before its first forward
        super().__setstate__(state)

    def dense_parameters(self):
        """Every parameter but the table (for a dense optimizer beside a sparse or fused one)."""
        return [p for n, p in self.named_parameters() if n != "values.weight"]


_FORMATS = {"int8": "INT8_ROWWISE", "int4": "INT4_ROWWISE", "fp8": "FP8_E4M3_ROWWISE"}


class QuantizedHashingMemory(torch.nn.Module):
    """A trained ``HashingMemory`` served from its value table quantized to int8, int4 or fp8
    rows (pkm's row-wise formats, docs/quantization.md): forward only.

        served = pkm_torch.QuantizedHashingMemory(trained_memory, "int8").eval()
        with torch.no_grad():
            y = served(x)

    The table becomes the uint8 buffer ``values.weight`` (rows of
    ``torch.ops.pkm.quantize_values``: int8 and int4 are FBGEMM's fused row-wise layouts); the
    dense parameters are copied, with the reference's names, and need no gradient. The format
    and v_dim are the module's extra state, so ``state_dict()`` / ``load_state_dict()`` round
    trip (load into a module made from any HashingMemory of the same shape). A call where
    autograd would need a gradient (``x.requires_grad`` with grad mode on) raises ValueError:
    quantized tables serve inference only. Under ``torch.autocast("cpu", dtype=torch.bfloat16)``
    the products run in bf16, as ``HashingMemory``'s do.
    """

    def __init__(self, memory, format="int8"):
        super().__init__()
        load_library()
        if format not in _FORMATS and format not in _FORMATS.values():
            raise ValueError("QuantizedHashingMemory: format = %r, expected one of %s" % (format, sorted(_FORMATS)))
        if not isinstance(memory, HashingMemory):
            raise ValueError("QuantizedHashingMemory: quantizes a pkm_torch.HashingMemory, got %s" % type(memory))
        self.format = _FORMATS.get(format, format)
        self._state = torch.classes.pkm.ForwardState()
        for name in ("input_dim", "output_dim", "heads", "knn", "k_dim", "n_keys", "v_dim", "qk_norm",
                     "qk_norm_scale", "score_activation", "score_compute"):
            setattr(self, name, getattr(memory, name))
        with torch.no_grad():
            self.keys = torch.nn.Parameter(memory.keys.detach().clone(), requires_grad=False)
            self.query_proj = _QueryProj(self.input_dim, self.heads * self.k_dim,
                                         memory.query_proj.query_mlps[0].bias is not None)
            self.query_proj.load_state_dict(memory.query_proj.state_dict())
            self.swilu_projection = self._copy(memory.swilu_projection)
            self.value_proj = self._copy(memory.value_proj)
            self.gating = self._copy(memory.gating)
            self.values = torch.nn.Module()
            self.values.register_buffer("weight", torch.ops.pkm.quantize_values(memory.values.weight.detach(),
                                                                                self.format))
        for p in self.parameters():
            p.requires_grad_(False)

    @staticmethod
    def _copy(linear):
        if linear is None:
            return None
        out = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        out.load_state_dict(linear.state_dict())
        return out

    def table_bytes(self):
        """Bytes of the quantized table."""
        return self.values.weight.numel()

    def forward(self, x):
        q = self.query_proj.query_mlps[0]

        def wb(layer):
            return (None, None) if layer is None else (layer.weight, layer.bias)

        w1, b1 = wb(self.swilu_projection)
        w2, b2 = wb(self.value_proj)
        wg, bg = wb(self.gating)
        return torch.ops.pkm.memory_quantized(x, self.keys, q.weight, q.bias, w1, b1, w2, b2, wg, bg,
                                              self.values.weight, self.format, self.v_dim, self.heads, self.knn,
                                              self.qk_norm, self.qk_norm_scale, "F32", self._state,
                                              self.score_activation, self.score_compute)

    def get_extra_state(self):
        return {"format": self.format, "v_dim": self.v_dim}

    def set_extra_state(self, state):
        if not isinstance(state, dict) or state.get("format") not in _FORMATS.values() or state.get("v_dim") != self.v_dim:
            raise ValueError("QuantizedHashingMemory: extra state %r, expected a format of %s and v_dim %d" %
                             (state, sorted(_FORMATS.values()), self.v_dim))
        self.format = state["format"]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The table's row bytes depend on the format: take the loaded buffer's shape as it is.
        key = prefix + "values.weight"
        if key in state_dict and state_dict[key].dtype == torch.uint8:
            self.values.weight = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def __setstate__(self, state):
        load_library()
        super().__setstate__(state)
