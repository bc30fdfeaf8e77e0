"""``asvd``: activation-aware SVD (Yuan et al. 2023, arXiv 2312.05821), uniform rank at the budget.

With the per-input scale ``s_j = (E|x_j|)^α + 1e-6`` (α = 0.5 by default, the reference's
``mean |x|`` statistic and its ``1e-6`` guard against dead inputs), take the truncated SVD of the
scaled weight ``W·diag(s) ≈ U diag(σ) Qᵀ`` and undo the scaling on the input side:
``W ≈ U diag(σ) (diag(s)⁻¹ Q)ᵀ`` — so ``V = diag(s)⁻¹ Q·√σ``, ``U ← U·√σ``. Inputs with large
activations get their weight columns approximated more faithfully.

Rank rule as for ``svd``: ``r = ⌊B / (m + n)⌋``, ``B = ⌊(1 − ρ)mn⌋``. Not included: the reference's
sensitivity-based per-layer rank search (ASVD's ``param_ratio`` allocation); every matrix gets the
same budget fraction here, like the other baselines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from capllm.methods.base import CompressedWeight, Method, StatsCompressor, register
from capllm.methods.lowrank import fold, truncated_svd
from capllm.methods.svd import budget_rank, low_rank_result


def asvd_scale(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    return abs_mean.double().clamp_min(0).pow(alpha) + 1e-6


class _ASVDCompressor(StatsCompressor):
    STATS = {"sq": False, "abs_mean": True}

    def compress(self, weight: torch.Tensor) -> CompressedWeight:
        r = budget_rank(weight, self.method.ratio)
        s_in = asvd_scale(self.stats.abs, self.method.options.alpha).to(torch.float32)
        U, s, Q = truncated_svd(weight.float() * s_in.unsqueeze(0), r)
        Uf, Qf = fold(U, s, Q)
        return low_rank_result(weight, Uf, Qf / s_in.unsqueeze(1), {})


@register
class ASVD(Method):
    name = "asvd"
    description = "activation-aware SVD: SVD of W·diag(mean|x|^α), α = 0.5 (Yuan et al. 2023)"

    @dataclass(frozen=True)
    class Options:
        alpha: float = 0.5

    def layer_compressor(self, handle):
        return _ASVDCompressor(handle.shape[1], handle.module.weight.device, self)
