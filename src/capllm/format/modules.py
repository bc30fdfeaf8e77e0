"""``LowRankSparseLinear``: ``y = U'(V'ᵀx) + S x (+ bias)`` — the compressed linear layer.

``U' (out × r)`` and ``V' (in × r)`` hold the low-rank part with σ folded in (either may be
absent, ``r = 0``); ``S (out × in)`` is the sparse part, held in one of two layouts:

* ``dense`` — a dense matrix with zeros (what the engine builds; the fast path on CPU unless
  ``S`` is very sparse: see :mod:`capllm.format.execution`);
* ``csr`` — ``torch.sparse_csr`` with int32 indices (``values``, ``col_indices``,
  ``crow_indices``); ``S x`` runs as the sparse × dense product ``(S @ xᵀ)ᵀ``.

:meth:`set_sparse_layout` converts between them in place; :attr:`execution` names the path the
forward takes (``lowrank``, ``lowrank+dense``, ``lowrank+csr``, ``dense``, ``csr``). Both layouts
compute the same function; they differ only in floating-point summation order.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


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
    def sparse_layout(self) -> str | None:
        """``dense``, ``csr`` or ``None`` (no sparse part)."""
        if self.S is None:
            return None
        return "csr" if self.S.layout == torch.sparse_csr else "dense"

    @property
    def execution(self) -> str:
        """The forward path: ``lowrank``, ``lowrank+dense``, ``lowrank+csr``, ``dense`` or ``csr``."""
        parts = (["lowrank"] if self.U is not None else []) + ([self.sparse_layout] if self.S is not None else [])
        return "+".join(parts)

    @property
    def nnz(self) -> int:
        if self.S is None:
            return 0
        return int(self.S._nnz()) if self.S.layout == torch.sparse_csr else int((self.S != 0).sum())

    def sparse_dense(self) -> torch.Tensor | None:
        """``S`` as a dense matrix (a fresh tensor for CSR)."""
        if self.S is None:
            return None
        return self.S.to_dense() if self.S.layout == torch.sparse_csr else self.S

    def set_sparse_layout(self, layout: str) -> "LowRankSparseLinear":
        """Hold ``S`` as ``dense`` or ``csr`` (in place; a no-op when it already is)."""
        if layout not in ("dense", "csr"):
            raise ValueError(f"unknown sparse layout {layout!r}: use dense or csr")
        if self.S is None or layout == self.sparse_layout:
            return self
        with torch.no_grad():
            new = to_csr(self.S.data) if layout == "csr" else self.S.data.to_dense()
        self.S = nn.Parameter(new, requires_grad=False)
        return self

    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent ``U'V'ᵀ + S`` (materialised on each access; for inspection)."""
        ref = self.U if self.U is not None else self.S
        w = torch.zeros(self.out_features, self.in_features, dtype=ref.dtype, device=ref.device)
        if self.U is not None:
            w = w + self.U @ self.V.t()
        if self.S is not None:
            w = w + self.sparse_dense()
        return w

    def _sparse_matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.S.layout != torch.sparse_csr:
            return F.linear(x, self.S)
        x2 = x.reshape(-1, self.in_features)
        y = (self.S @ x2.t()).t()
        return y.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.U is None:  # sparse only: one product, bias fused where the layout allows
            if self.S.layout != torch.sparse_csr:
                return F.linear(x, self.S, self.bias)
            y = self._sparse_matmul(x)
            return y if self.bias is None else y + self.bias
        y = F.linear(F.linear(x, self.V.t()), self.U)
        if self.S is not None:
            y = y + self._sparse_matmul(x)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, nnz={self.nnz}, bias={self.bias is not None}, execution={self.execution}"
