"""``sparsegpt``: one-shot OBS pruning with weight reconstruction (Frantar & Alistarh 2023, arXiv 2301.00774).

The solve itself — damping, the blocked column sweep, the per-block mask and the OBS update — is
:func:`capllm.solvers.obs.sparsegpt_prune`, documented there; this file is the method around it:
the input statistics it needs (``E[x xᵀ]``) and its options.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from capllm.methods.base import CompressedWeight, Method, StatsCompressor, register
from capllm.solvers.obs import sparsegpt_prune


class _SparseGPTCompressor(StatsCompressor):
    STATS = {"sq": False, "gram": True}

    def compress(self, weight: torch.Tensor) -> CompressedWeight:
        o = self.method.options
        W, keep, info = sparsegpt_prune(weight, self.stats.gram, self.method.ratio, self.method.structure, o.blocksize, o.percdamp)
        return CompressedWeight(S=W.to(weight.dtype) * keep, mask=keep, info=info)


@register
class SparseGPT(Method):
    name = "sparsegpt"
    description = "OBS pruning with weight reconstruction, 128-column blocks (Frantar & Alistarh 2023)"
    supports_structure = True

    @dataclass(frozen=True)
    class Options:
        blocksize: int = 128
        percdamp: float = 0.01

    def layer_compressor(self, handle):
        return _SparseGPTCompressor(handle.shape[1], handle.module.weight.device, self)
