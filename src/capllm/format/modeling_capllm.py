"""A capllm compressed model for plain transformers: ``from_pretrained(dir, trust_remote_code=True)``.

This file is copied unchanged into every directory that ``capllm.save_compressed`` writes and is
named by that directory's ``config.json``::

    "auto_map": {"AutoModelForCausalLM": "modeling_capllm.Capllm<Architecture>"}

e.g. ``CapllmLlamaForCausalLM``. It needs only torch and transformers (not capllm). The class is
made on demand (PEP 562 module ``__getattr__``): it subclasses the original architecture's class
from transformers and, after building it, replaces every module listed in
``config.capllm["modules"]`` by a :class:`CapllmLinear` whose parameters match the tensors on
disk, so transformers' own loader (meta-device init, sharded safetensors, tied weights, dtype)
fills them. Before loading, the file sizes and SHA-256 digests recorded in
``config.capllm["files"]`` are checked, so a truncated or altered file fails loudly.

Storage of one compressed linear ``y = U'(V'ᵀx) + S x + b`` (shape ``(out, in)``):

* ``<name>.U (out, r)``, ``<name>.V (in, r)``: the low-rank factors, dense (absent when r = 0);
* ``S`` either dense as ``<name>.S (out, in)`` (layout ``dense``) or, layout ``bitmask`` (the
  idea of compressed-tensors' ``sparse-bitmask``): ``<name>.S_values (nnz,)`` the non-zeros in
  row-major order and ``<name>.S_bitmask (out, ceil(in/8)) uint8`` with bit ``j % 8`` (least
  significant first) of byte ``j // 8`` in row ``i`` set iff ``S[i, j] != 0``;
* ``<name>.bias (out,)`` when the layer has one.

Execution of a bitmask ``S``: when capllm is installed and has a packed kernel for the device
(``capllm.kernels``: compiled on CPU, Triton on CUDA), the layer's first forward asks capllm's
execution policy (``capllm.format.execution.choose_layout``, the measurement ``capllm.load_compressed``
makes, cached per shape) what to run: the kernel up to ``kernel_max_tokens`` tokens (decode, the
whole layer ``U'(V'ᵀx) + S x + b`` in one call, on the vector path the probe found faster —
``kernel_isa``), and for longer inputs (prefill) the dense GEMM on ``S + U'V'ᵀ`` unpacked a block
of rows (of columns, for a wide matrix) at a time — no dense copy is kept; or dense, when the probe finds the kernel slower. The
choice is kept in ``capllm_decision``. With an older capllm that has no such policy the kernel
runs up to ``KERNEL_MAX_TOKENS`` tokens on its default path. Without capllm (or without a
kernel) ``S`` is unpacked to a dense matrix on the first forward and cached (not saved).
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
import torch.nn.functional as F
import transformers
from torch import nn

FORMAT_VERSION = 1
CONFIG_KEY = "capllm"
CLASS_PREFIX = "Capllm"
KERNEL_MAX_TOKENS = 8


def _capllm_kernels():
    """``capllm.kernels`` when capllm is installed, else ``None`` (this file must run without it)."""
    try:
        from capllm import kernels
    except Exception:
        return None
    return kernels


def _capllm_policy(pk, dtype: torch.dtype) -> dict:
    """What capllm's execution policy runs for the packed ``pk``: ``{"layout": "bitmask" | "dense",
    "kernel_max_tokens", "kernel_isa", ...the decision}``. Without the policy (an older capllm) or
    if it fails: the kernel up to ``KERNEL_MAX_TOKENS`` tokens on its default path."""
    fallback = {"layout": "bitmask", "kernel_max_tokens": KERNEL_MAX_TOKENS, "kernel_isa": None, "reason": "capllm has no execution policy: defaults"}
    try:
        from capllm.format.execution import choose_layout
    except Exception:
        return fallback
    if not hasattr(pk, "linear_prefill"):
        return fallback
    try:
        layout, decision = choose_layout(pk, "auto", dense_dtype=dtype)
    except Exception as exc:  # a probe must never break inference: run the defaults
        return {**fallback, "reason": f"capllm's probe failed ({type(exc).__name__}): defaults"}
    # CSR is capllm's own loader's business: here anything but the kernel runs dense
    return {**decision, "layout": "bitmask" if layout == "bitmask" else "dense",
            "kernel_max_tokens": int(decision.get("kernel_max_tokens", KERNEL_MAX_TOKENS)), "kernel_isa": decision.get("kernel_isa")}


def unpack_mask(bitmask: torch.Tensor, n: int) -> torch.Tensor:
    """``(m, ceil(n/8)) uint8`` → ``(m, n)`` bool (bit ``j % 8`` of byte ``j // 8``, LSB first)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :n].bool()


def unpack_bitmask(values: torch.Tensor, bitmask: torch.Tensor, shape) -> torch.Tensor:
    """Dense ``(m, n)`` matrix from row-major non-zeros ``values`` and the packed ``bitmask``."""
    m, n = int(shape[0]), int(shape[1])
    mask = unpack_mask(bitmask, n)
    nnz = int(mask.sum())
    if mask.shape != (m, n) or nnz != values.numel():
        raise ValueError(f"capllm: bitmask ({tuple(bitmask.shape)}, {nnz} bits set) does not match shape {(m, n)} with {values.numel()} values: the checkpoint is corrupt")
    return torch.zeros(m, n, dtype=values.dtype, device=values.device).masked_scatter_(mask, values)


class CapllmLinear(nn.Module):
    """``y = U'(V'ᵀx) + S x + b`` with parameters named as on disk (see the module docstring)."""

    def __init__(self, spec: dict) -> None:
        super().__init__()
        out_f, in_f = spec["shape"]
        r = int(spec.get("rank", 0))
        self.in_features, self.out_features, self.layout = in_f, out_f, spec.get("sparse_layout")
        p = lambda *shape: nn.Parameter(torch.empty(*shape), requires_grad=False)  # noqa: E731
        self.U = p(out_f, r) if r > 0 else None
        self.V = p(in_f, r) if r > 0 else None
        self.S = p(out_f, in_f) if self.layout == "dense" else None
        if self.layout == "bitmask":
            self.S_values = p(int(spec["nnz"]))
            self.register_buffer("S_bitmask", torch.empty(out_f, (in_f + 7) // 8, dtype=torch.uint8))
        elif self.layout not in (None, "dense"):
            raise ValueError(f"capllm: unknown sparse layout {self.layout!r} (this file reads format {FORMAT_VERSION})")
        self.bias = p(out_f) if spec.get("bias") else None
        self._S_cache = None
        self._packed = None  # a capllm.kernels.BitmaskMatrix over S_values' storage, once built
        self.capllm_decision = None  # capllm's choice for the packed matrix (see _capllm_policy)

    def _kernel_matrix(self):
        """The packed matrix for capllm's kernel on this device, or ``None`` (no capllm / no kernel)."""
        if self.layout != "bitmask":
            return None
        pk = self._packed
        if pk is not None and pk.device == self.S_values.device and pk.values.data_ptr() == self.S_values.data_ptr():
            return pk
        kernels = _capllm_kernels()
        if kernels is None or kernels.kernel_backend(self.S_values.device) is None or self.S_values.dtype not in kernels.VALUE_DTYPES:
            return None
        pk = kernels.BitmaskMatrix.from_packed(self.S_values.data, self.S_bitmask, (self.out_features, self.in_features))
        self.S_values.data = pk.values[: pk.nnz]  # share the padded copy's storage: no second copy of the values
        self._packed = pk
        self.capllm_decision = _capllm_policy(pk, self.S_values.dtype)
        return pk

    def sparse_dense(self) -> torch.Tensor | None:
        """``S`` as a dense matrix (unpacked once per device and dtype, then cached)."""
        if self.layout != "bitmask":
            return self.S
        c = self._S_cache
        if c is None or c.device != self.S_values.device or c.dtype != self.S_values.dtype:
            c = self._S_cache = unpack_bitmask(self.S_values, self.S_bitmask, (self.out_features, self.in_features))
        return c

    def _packed_plan(self):
        """``(packed matrix, capllm's decision)`` when the kernel serves this layer, else ``None``."""
        pk = self._kernel_matrix() if self._S_cache is None else None
        if pk is None or self.capllm_decision["layout"] != "bitmask":
            return None
        return pk, self.capllm_decision

    def _sparse(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._packed_plan()
        if plan is None:
            return F.linear(x, self.sparse_dense())
        pk, d = plan
        if x.numel() // self.in_features <= d["kernel_max_tokens"]:
            return pk.matmul(x)
        return F.linear(x, pk.dense().to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._packed_plan()
        if plan is not None and plan[1]["kernel_isa"] is not None:  # capllm's policy: the whole layer in one call
            pk, d = plan
            if x.numel() // self.in_features <= d["kernel_max_tokens"]:
                return pk.matmul(x, isa=d["kernel_isa"], U=self.U, V=self.V, bias=self.bias)
            return pk.linear_prefill(x, U=self.U, V=self.V, bias=self.bias)
        if self.U is None:
            if self.layout == "dense":
                return F.linear(x, self.S, self.bias)
            y = self._sparse(x)
            return y if self.bias is None else y + self.bias
        y = F.linear(F.linear(x, self.V.t()), self.U)
        if self.layout is not None:
            y = y + self._sparse(x)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        r = 0 if self.U is None else self.U.shape[1]
        return f"in={self.in_features}, out={self.out_features}, rank={r}, sparse={self.layout}, bias={self.bias is not None}"


def swap_in(model: nn.Module, modules: list[dict]) -> None:
    """Replace each listed module of ``model`` by a :class:`CapllmLinear` built from its spec."""
    for spec in modules:
        parent, _, child = spec["name"].rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if not hasattr(owner, child):
            raise ValueError(f"capllm: the model has no module {spec['name']!r}: config.json does not match the architecture")
        setattr(owner, child, CapllmLinear(spec))


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_files(folder: str, files: dict | None = None) -> None:
    """Check every file recorded in ``config.capllm["files"]``: present, right size, right SHA-256.

    Raises ``ValueError`` naming the file and what is wrong.
    """
    if files is None:
        with open(os.path.join(folder, "config.json")) as f:
            files = json.load(f).get(CONFIG_KEY, {}).get("files", {})
    for name, rec in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ValueError(f"capllm: {path} is missing: the compressed model directory is incomplete")
        size = os.path.getsize(path)
        if size != rec["bytes"]:
            raise ValueError(f"capllm: {path} has {size} bytes, expected {rec['bytes']}: the file is truncated or was replaced")
        if sha256_file(path) != rec["sha256"]:
            raise ValueError(f"capllm: {path} fails its SHA-256 check: the file is corrupt or was modified")


_CLASSES: dict[tuple[str, bool], type] = {}


def capllm_class(base: type, verify: bool = True) -> type:
    """The subclass of ``base`` (a transformers ``...ForCausalLM``) that loads a capllm directory."""
    key = (base.__name__, verify)
    if key in _CLASSES:
        return _CLASSES[key]

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        section = getattr(config, CONFIG_KEY, None) or {}
        if section.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(f"capllm: format version {section['format_version']} is newer than this file reads ({FORMAT_VERSION})")
        swap_in(self, section.get("modules", []))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        if verify and os.path.isdir(str(pretrained_model_name_or_path)):
            verify_files(str(pretrained_model_name_or_path))
        return super(klass, cls).from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    name = CLASS_PREFIX + base.__name__
    klass = type(name, (base,), {"__init__": __init__, "from_pretrained": from_pretrained, "__module__": __name__, "__doc__": f"{base.__name__} with capllm compressed linear layers."})
    _CLASSES[key] = klass
    return klass


def __getattr__(name: str):
    """``Capllm<Architecture>`` → the loading class for that transformers architecture."""
    if name.startswith(CLASS_PREFIX) and name != CLASS_PREFIX:
        base = getattr(transformers, name[len(CLASS_PREFIX):], None)
        if isinstance(base, type):
            return capllm_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
