"""``wanda``: prune by ``|W_ij|·‖X_j‖₂`` within each output row (Sun et al. 2023, arXiv 2306.11695).

The score's input norm comes from :class:`~capllm.engine.stats.InputStats` (``E[x_j²]``, the
same ranking as ``‖X_j‖₂²``). Every row drops its ``⌊ρ·n⌋`` lowest-scored weights, so each row is
exactly ρ sparse; ``N:M`` keeps the ``N`` best of each ``M`` consecutive inputs. No weight update.
"""

from __future__ import annotations

import torch

from capllm.methods.base import CompressedWeight, Method, StatsCompressor, register
from capllm.methods.masks import keep_nm, prune_lowest_per_row


def wanda_score(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| · sqrt(E[x_j²])``."""
    return weight.abs() * sq_norm.sqrt().to(weight.dtype).unsqueeze(0)


def wanda_mask(weight: torch.Tensor, sq_norm: torch.Tensor, ratio: float, structure=None) -> torch.Tensor:
    score = wanda_score(weight, sq_norm)
    if structure is not None:
        return keep_nm(score, structure)
    return prune_lowest_per_row(score, int(weight.shape[1] * ratio))


class _WandaCompressor(StatsCompressor):
    STATS = {"sq": True}

    def compress(self, weight: torch.Tensor) -> CompressedWeight:
        mask = wanda_mask(weight, self.stats.sq, self.method.ratio, self.method.structure)
        return CompressedWeight(S=weight * mask, mask=mask)


@register
class Wanda(Method):
    name = "wanda"
    description = "prune |W|·‖X_j‖ per output row (Sun et al. 2023)"
    supports_structure = True

    def layer_compressor(self, handle):
        return _WandaCompressor(handle.shape[1], handle.module.weight.device, self)
