"""``LowRankSparseLinear``: ``y = U'(V'ᵀx) + S x (+ bias)`` — the compressed linear layer.

``U' (out × r)`` and ``V' (in × r)`` hold the low-rank part with σ folded in (either may be
absent, ``r = 0``); ``S (out × in)`` is the sparse part. In memory ``S`` is kept dense with zeros
(the fastest path on CPU below ~90 % sparsity); the storage format and sparse kernels live in
:mod:`capllm.format`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LowRankSparseLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, sparse: bool, bias: bool, dtype=torch.float32, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        kw = {"dtype": dtype, "device": device}
        self.U = nn.Parameter(torch.empty(out_features, rank, **kw), requires_grad=False) if rank > 0 else None
        self.V = nn.Parameter(torch.empty(in_features, rank, **kw), requires_grad=False) if rank > 0 else None
        self.S = nn.Parameter(torch.empty(out_features, in_features, **kw), requires_grad=False) if sparse else None
        self.bias = nn.Parameter(torch.empty(out_features, **kw), requires_grad=False) if bias else None

    @classmethod
    def from_factors(cls, U, V, S, bias) -> "LowRankSparseLinear":
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
    def weight(self) -> torch.Tensor:
        """The dense equivalent ``U'V'ᵀ + S`` (materialised on each access; for inspection)."""
        w = torch.zeros(self.out_features, self.in_features, dtype=(self.U if self.U is not None else self.S).dtype, device=(self.U if self.U is not None else self.S).device)
        if self.U is not None:
            w = w + self.U @ self.V.t()
        if self.S is not None:
            w = w + self.S
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        if self.U is not None:
            y = F.linear(F.linear(x, self.V.t()), self.U)
        if self.S is not None:
            ys = F.linear(x, self.S)
            y = ys if y is None else y + ys
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        nnz = int((self.S != 0).sum()) if self.S is not None else 0
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, nnz={nnz}, bias={self.bias is not None}"
