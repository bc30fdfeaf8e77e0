"""``sparsegpt``: one-shot OBS pruning with weight reconstruction (Frantar & Alistarh 2023, arXiv 2301.00774).

The solve itself — damping, the blocked column sweep, the per-block mask and the OBS update — is
:func:`capllm.solvers.obs.sparsegpt_prune`, documented there; this file is the method around it:
the input statistics it needs (``E[x xᵀ]``) and its options.

``cg_iters > 0`` (our addition, off by default: the paper's method is 0) follows the pass with
conjugate-gradient steps to the exact least-squares values on the support it chose
(:func:`capllm.solvers.support_lstsq.refine_on_support`) — the same step CAP's refit can take
(``refit_iters``), so the two can be compared with and without it. ``tune_epochs > 0`` (also
ours, off by default) trains each block's kept values on its output afterwards
(:mod:`capllm.engine.block_tune`), as CAP's refit can.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from capllm.engine.block_tune import BlockTuneOptions
from capllm.methods.base import CompressedWeight, Method, StatsCompressor, register
from capllm.errors import CapllmError
from capllm.solvers.obs import sparsegpt_prune
from capllm.solvers.support_lstsq import refine_on_support


class _SparseGPTCompressor(StatsCompressor):
    STATS = {"sq": False, "gram": True}

    def compress(self, weight: torch.Tensor) -> CompressedWeight:
        o = self.method.options
        W, keep, info = sparsegpt_prune(weight, self.stats.gram, self.method.ratio, self.method.structure, o.blocksize, o.percdamp)
        if o.cg_iters:
            W = refine_on_support(W * keep, weight, self.stats.gram, keep, o.cg_iters, o.percdamp)
            info = {**info, "cg_iters": o.cg_iters}
        return CompressedWeight(S=W.to(weight.dtype) * keep, mask=keep, info=info)


@register
class SparseGPT(Method):
    name = "sparsegpt"
    description = "OBS pruning with weight reconstruction, 128-column blocks (Frantar & Alistarh 2023)"
    supports_structure = True

    @dataclass(frozen=True)
    class Options(BlockTuneOptions):
        blocksize: int = 128
        percdamp: float = 0.01
        cg_iters: int = 0

    def __init__(self, ratio: float, structure=None, options: dict | None = None) -> None:
        super().__init__(ratio, structure, options)
        if self.options.cg_iters < 0:  # before any work is done
            raise CapllmError(f"sparsegpt option cg_iters={self.options.cg_iters}: must be ≥ 0")

    def layer_compressor(self, handle):
        return _SparseGPTCompressor(handle.shape[1], handle.module.weight.device, self)
