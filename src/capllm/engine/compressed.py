"""One compressed matrix, ``W ≈ U Vᵀ + S``: what a method's layer compressor, CAP's refit and
a checkpoint produce, and what :meth:`capllm.engine.context.CompressionContext.apply` writes into
the model. It lives in the engine (the lowest layer that handles it) so that ``allocate`` and
``methods`` both build on it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class CompressedWeight:
    """``W ≈ U Vᵀ + S`` for one ``(m, n)`` matrix.

    ``S`` is stored dense with zeros off its support ``mask`` (``None``: no sparse part);
    ``U (m, r)`` and ``V (n, r)`` carry the low-rank part with σ folded in (``None``: no
    low-rank part). ``info`` holds method-specific diagnostics (JSON-serialisable).
    """

    S: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    U: torch.Tensor | None = None
    V: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.S is not None and self.mask is None:
            self.mask = self.S != 0
        if (self.U is None) != (self.V is None):
            raise ValueError("U and V must both be given or both be None")

    @property
    def rank(self) -> int:
        return 0 if self.U is None else self.U.shape[1]

    @property
    def nnz(self) -> int:
        return 0 if self.mask is None else int(self.mask.sum())

    def kept_params(self) -> int:
        if self.U is not None:
            m, n = self.U.shape[0], self.V.shape[0]
            return self.rank * (m + n) + self.nnz
        return self.nnz

    def dense(self) -> torch.Tensor:
        if self.U is None:
            return self.S
        low = self.U @ self.V.t()
        return low if self.S is None else low + self.S
