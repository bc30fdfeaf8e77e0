"""``LowRankSparseLinear``: ``y = U'(V'ᵀx) + S x (+ bias)`` — the compressed linear layer.

``U' (out × r)`` and ``V' (in × r)`` hold the low-rank part with σ folded in (either may be
absent, ``r = 0``); ``S (out × in)`` is the sparse part, held in one of three layouts:

* ``dense`` — a dense matrix with zeros (what the engine builds);
* ``csr`` — ``torch.sparse_csr`` with int32 indices (``values``, ``col_indices``,
  ``crow_indices``); ``S x`` runs as the sparse × dense product ``(S @ xᵀ)ᵀ``;
* ``bitmask`` — the saved packed layout (buffers ``S_values``, ``S_bitmask``, ``S_row_ptr``: a
  :class:`capllm.kernels.BitmaskMatrix`). An input of at most :attr:`kernel_max_tokens` tokens
  runs the packed kernel (reads ~half the bytes of dense at 50 % density: the decode path);
  a longer one runs the dense GEMM on ``S`` unpacked a few MB of rows at a time into a reused buffer
  (the prefill path), so the module never keeps a dense copy.

Which layout runs where is chosen at load time by :mod:`capllm.format.execution`.
:meth:`set_sparse_layout` converts in place; :attr:`execution` names the path the forward
takes (``lowrank``, ``lowrank+dense``, ``lowrank+csr``, ``lowrank+bitmask``, ``dense``, ``csr``,
``bitmask``). All layouts compute the same function up to floating-point summation order (and,
for ``bitmask`` values stored in bf16/fp16, the rounding of ``S``'s entries to that dtype).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from capllm.kernels import BitmaskMatrix

LAYOUTS = ("dense", "csr", "bitmask")
DEFAULT_KERNEL_MAX_TOKENS = 8


def make_csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape, index_dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """A ``torch.sparse_csr`` tensor (int32 indices unless ``nnz`` needs int64), without torch's beta warning."""
    if values.numel() >= 2**31 - 1:
        index_dtype = torch.int64
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        return torch.sparse_csr_tensor(crow.to(index_dtype), col.to(index_dtype), values, tuple(shape), dtype=values.dtype, device=values.device, check_invariants=False)


def to_csr(S: torch.Tensor, index_dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Dense ``(m, n)`` → CSR with ``index_dtype`` indices (int32 halves the index bytes)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        c = S.to_sparse_csr()
    return make_csr(c.crow_indices(), c.col_indices(), c.values(), c.shape, index_dtype)


class LowRankSparseLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, sparse: bool, bias: bool, dtype=torch.float32, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        kw = {"dtype": dtype, "device": device}
        self.U = nn.Parameter(torch.empty(out_features, rank, **kw), requires_grad=False) if rank > 0 else None
        self.V = nn.Parameter(torch.empty(in_features, rank, **kw), requires_grad=False) if rank > 0 else None
        self.S = nn.Parameter(torch.empty(out_features, in_features, **kw), requires_grad=False) if sparse else None
        self.bias = nn.Parameter(torch.empty(out_features, **kw), requires_grad=False) if bias else None
        self.decision: dict[str, Any] | None = None  # why the loader chose this layout (set by capllm.format.execution)
        self.kernel_max_tokens = DEFAULT_KERNEL_MAX_TOKENS  # bitmask layout: inputs up to this many tokens run the packed kernel
        self.kernel_isa = "auto"  # bitmask layout: the CPU kernel path decode runs (the loader's probe may pick avx2 over avx512)
        self._packed_shape: tuple[int, int] | None = None

    @classmethod
    def from_factors(cls, U, V, S, bias) -> "LowRankSparseLinear":
        if U is not None and U.shape[1] == 0:  # rank 0: no low-rank part
            U = V = None
        if U is None and S is None:
            raise ValueError("LowRankSparseLinear needs a low-rank part, a sparse part, or both")
        ref = U if U is not None else S
        out_f = ref.shape[0]
        in_f = V.shape[0] if V is not None else S.shape[1]
        mod = cls(in_f, out_f, 0 if U is None else U.shape[1], S is not None, bias is not None, dtype=ref.dtype, device=ref.device)
        with torch.no_grad():
            for name, t in (("U", U), ("V", V), ("S", S), ("bias", bias)):
                if t is not None:
                    getattr(mod, name).copy_(t)
        return mod

    @property
    def rank(self) -> int:
        return 0 if self.U is None else self.U.shape[1]

    @property
    def packed(self) -> BitmaskMatrix | None:
        """The bitmask-layout ``S`` (``None`` in the other layouts); a view of the module's buffers."""
        if self._packed_shape is None:
            return None
        return BitmaskMatrix(self.S_values, self.S_bitmask, self.S_row_ptr, self._packed_shape)

    def set_packed(self, packed: BitmaskMatrix, dense_dtype: torch.dtype | None = None) -> "LowRankSparseLinear":
        """Hold ``S`` as ``packed`` (bitmask layout), dropping any dense or CSR ``S``.

        ``dense_dtype``: the dtype ``S`` has as a dense matrix (what :meth:`sparse_dense` and a
        save give back; default the values' storage dtype)."""
        self.S = None
        for name, t in packed.tensors().items():
            self.register_buffer("S_" + name, t)
        self._packed_shape = packed.shape
        self._dense_dtype = dense_dtype or packed.dtype
        return self

    def _drop_packed(self) -> None:
        for name in ("S_values", "S_bitmask", "S_row_ptr"):
            self._buffers.pop(name, None)
        self._packed_shape = None

    @property
    def sparse_layout(self) -> str | None:
        """``dense``, ``csr``, ``bitmask`` or ``None`` (no sparse part)."""
        if self._packed_shape is not None:
            return "bitmask"
        if self.S is None:
            return None
        return "csr" if self.S.layout == torch.sparse_csr else "dense"

    @property
    def execution(self) -> str:
        """The forward path: ``lowrank``, ``lowrank+dense``, ``lowrank+csr``, ``dense`` or ``csr``."""
        parts = (["lowrank"] if self.U is not None else []) + ([self.sparse_layout] if self.sparse_layout else [])
        return "+".join(parts)

    @property
    def nnz(self) -> int:
        if self._packed_shape is not None:
            return self.packed.nnz
        if self.S is None:
            return 0
        return int(self.S._nnz()) if self.S.layout == torch.sparse_csr else int((self.S != 0).sum())

    def sparse_dense(self) -> torch.Tensor | None:
        """``S`` as a dense matrix (a fresh tensor for CSR and bitmask)."""
        if self._packed_shape is not None:
            return self.packed.dense().to(self._dense_dtype)
        if self.S is None:
            return None
        return self.S.to_dense() if self.S.layout == torch.sparse_csr else self.S

    def set_sparse_layout(self, layout: str, value_dtype: torch.dtype | None = None) -> "LowRankSparseLinear":
        """Hold ``S`` as ``dense``, ``csr`` or ``bitmask`` (in place; a no-op when it already is).

        ``value_dtype`` (bitmask only): store the non-zeros in this dtype (default: ``S``'s).
        """
        if layout not in LAYOUTS:
            raise ValueError(f"unknown sparse layout {layout!r}: use {', '.join(LAYOUTS)}")
        if self.sparse_layout is None or layout == self.sparse_layout:
            return self
        with torch.no_grad():
            if layout == "bitmask":
                dense = self.sparse_dense()
                return self.set_packed(BitmaskMatrix.from_dense(dense, value_dtype), dense.dtype)
            dense = self.sparse_dense()
            self._drop_packed()
            new = to_csr(dense) if layout == "csr" else dense
        self.S = nn.Parameter(new, requires_grad=False)
        return self

    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent ``U'V'ᵀ + S`` (materialised on each access; for inspection)."""
        ref = self.U if self.U is not None else self.S if self.S is not None else self.S_values
        w = torch.zeros(self.out_features, self.in_features, dtype=ref.dtype, device=ref.device)
        if self.U is not None:
            w = w + self.U @ self.V.t()
        if self.sparse_layout is not None:
            w = w + self.sparse_dense().to(ref.dtype)
        return w

    def _sparse_matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.S.layout != torch.sparse_csr:
            return F.linear(x, self.S)
        x2 = x.reshape(-1, self.in_features)
        y = (self.S @ x2.t()).t()
        return y.reshape(*x.shape[:-1], self.out_features)

    def _packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Bitmask layout. Decode (≤ ``kernel_max_tokens`` tokens): the whole layer in one kernel
        call. Prefill: the dense GEMM on ``unpack(S) + U Vᵀ``, built a few MB of rows at a time in a
        reused buffer (:meth:`~capllm.kernels.BitmaskMatrix.linear_prefill`), so the low-rank part
        costs no extra passes over the activations and no call allocates a dense matrix."""
        if x.numel() // self.in_features <= self.kernel_max_tokens:
            return self.packed.matmul(x, isa=self.kernel_isa, U=self.U, V=self.V, bias=self.bias)
        return self.packed.linear_prefill(x, U=self.U, V=self.V, bias=self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed_shape is not None:
            return self._packed_forward(x)
        if self.U is None:  # sparse only: one product, bias fused where the layout allows
            if self.sparse_layout == "dense":
                return F.linear(x, self.S, self.bias)
            y = self._sparse_matmul(x)
            return y if self.bias is None else y + self.bias
        y = F.linear(F.linear(x, self.V.t()), self.U)
        if self.sparse_layout is not None:
            y = y + self._sparse_matmul(x)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, nnz={self.nnz}, bias={self.bias is not None}, execution={self.execution}"
