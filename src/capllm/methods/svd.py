"""``svd``: plain truncated SVD of every weight, one uniform rank per matrix at the budget.

``W ≈ U_r diag(σ_r) V_rᵀ`` (Eckart–Young: the best rank-``r`` approximation in Frobenius norm),
stored with ``√σ`` folded into both factors. Rank rule: ``r = ⌊B / (m + n)⌋`` with
``B = ⌊(1 − ρ)·m·n⌋`` the matrix budget, so the kept count ``r(m + n)`` never exceeds ``B`` and
misses it by less than one rank-1 direction (``m + n`` parameters). No calibration data.
"""

from __future__ import annotations

import torch

from capllm.methods.base import CompressedWeight, Method, matrix_budget, register
from capllm.methods.lowrank import fold, rank_at_budget, truncated_svd


def low_rank_result(weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor, info: dict) -> CompressedWeight:
    """A low-rank-only :class:`CompressedWeight` (an all-zero sparse result when the rank is 0)."""
    if U.shape[1] == 0:
        zero = torch.zeros_like(weight)
        return CompressedWeight(S=zero, mask=zero.bool(), info=info)
    return CompressedWeight(U=U.to(weight.dtype), V=V.to(weight.dtype), info=info)


def budget_rank(weight: torch.Tensor, ratio: float) -> int:
    m, n = weight.shape
    return rank_at_budget(m, n, matrix_budget(m, n, ratio))


class _SVDCompressor:
    def __init__(self, ratio: float) -> None:
        self.ratio = ratio

    def add_batch(self, inp, out) -> None:
        pass

    def reduce(self, dist) -> None:
        pass  # no statistics

    def compress(self, weight: torch.Tensor) -> CompressedWeight:
        r = budget_rank(weight, self.ratio)
        U, s, V = truncated_svd(weight.float(), r)
        total = float(weight.double().pow(2).sum())
        kept = float(s.double().pow(2).sum())
        info = {"rel_weight_error": round(max(total - kept, 0.0) ** 0.5 / max(total, 1e-30) ** 0.5, 6)}
        return low_rank_result(weight, *fold(U, s, V), info)

    def free(self) -> None:
        pass


@register
class SVD(Method):
    name = "svd"
    description = "plain truncated SVD of each weight, uniform rank at the budget (no calibration)"
    needs_calibration = False

    def layer_compressor(self, handle):
        return _SVDCompressor(self.ratio)
