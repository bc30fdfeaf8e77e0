"""``magnitude``: keep the largest ``|W_ij|`` of each matrix (per-matrix comparison group).

Keeps ``⌊(1 − ρ)·m·n⌋`` entries of every matrix (``N:M``: the ``N`` largest of every ``M``
consecutive inputs). No calibration data.
"""

from __future__ import annotations

import torch

from capllm.methods.base import CompressedWeight, Method, matrix_budget, register
from capllm.methods.masks import keep_nm, keep_top_k


class _MagnitudeCompressor:
    def __init__(self, ratio, structure):
        self.ratio, self.structure = ratio, structure

    def add_batch(self, inp, out) -> None:
        pass

    def compress(self, weight: torch.Tensor) -> CompressedWeight:
        score = weight.abs()
        if self.structure is not None:
            mask = keep_nm(score, self.structure)
        else:
            mask = keep_top_k(score, matrix_budget(*weight.shape, self.ratio))
        return CompressedWeight(S=weight * mask, mask=mask)

    def free(self) -> None:
        pass


@register
class Magnitude(Method):
    name = "magnitude"
    description = "keep the largest |W| of each matrix (no calibration)"
    needs_calibration = False
    supports_structure = True

    def layer_compressor(self, handle):
        return _MagnitudeCompressor(self.ratio, self.structure)
