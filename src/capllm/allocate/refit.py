"""Refit of the kept sparse values after CAP's allocation (our addition; not in the paper).

CAP's Stage 2 chooses *which* singular directions and sparse entries survive but keeps their
Stage 1 values, so nothing compensates for what was removed. The refit keeps the chosen support
and the chosen low-rank factors ``U'V'ᵀ`` and re-solves the sparse values so that the layer
output error ``‖(W − U'V'ᵀ − S) X‖`` is small: SparseGPT's OBS reconstruction
(:func:`capllm.solvers.obs.sparsegpt_prune` with the support fixed) on the residual
``W − U'V'ᵀ``, optionally followed by ``refit_iters`` conjugate-gradient steps to the exact
least-squares optimum on that support (:func:`capllm.solvers.support_lstsq.refine_on_support`;
the sequential OBS pass never lets an earlier kept weight compensate for a later removal). It runs through the layer-wise engine, so each block is refitted on the inputs
produced by the already compressed blocks before it — exactly SparseGPT's sequential setting.
The kept-parameter count does not change.

``reselect`` (``refit=reselect``, our addition) keeps the allocation's *counts* — the rank of
every matrix and the number of sparse entries in each block of ``blocksize`` columns — but lets
the OBS pass choose which entries of the residual survive, by SparseGPT's
``w²/[Hinv]_jj²`` on the weights as the earlier columns' updates left them. The allocation's
scores are computed once, from Stage 1's sparse part before anything is removed; the OBS
choice sees the error that the earlier removals of the same matrix have already moved into each
weight (Frantar & Alistarh 2023, sec. 3.3: adaptive mask selection). With an N:M structure the
counts are kept per row and group of M columns (so the result stays N:M) and the OBS pass chooses
each group's survivors when it reaches the group, as SparseGPT's N:M prune does.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch

from capllm.engine.layerwise import run_layerwise
from capllm.engine.stats import InputStats
from capllm.engine.compressed import CompressedWeight
from capllm.solvers.obs import sparsegpt_prune
from capllm.solvers.support_lstsq import refine_on_support, support_objective


@dataclass
class Decision:
    """What Stage 2 kept for one matrix: factors (σ folded in) and the sparse support."""

    U: torch.Tensor | None
    V: torch.Tensor | None
    S: torch.Tensor | None  # Stage 1 values on the support (used when the support is empty of data)
    mask: torch.Tensor  # (m, n) bool support of the sparse part

    def dense(self) -> torch.Tensor:
        """``W̃ = U Vᵀ + S`` (float32) with these values, as the model would run it before a refit."""
        W = torch.zeros(self.mask.shape, dtype=torch.float32) if self.S is None else self.S.float().clone()
        if self.U is not None:
            W += self.U.float() @ self.V.float().t()
        return W


class _RefitCompressor:
    def __init__(self, n_in: int, device, decision: Decision, blocksize: int, percdamp: float, iters: int = 0, reselect: bool = False,
                 structure: tuple[int, int] | None = None) -> None:
        self.stats = InputStats(n_in, device, sq=False, gram=True)
        self.d, self.blocksize, self.percdamp, self.iters, self.reselect = decision, blocksize, percdamp, iters, reselect
        self.structure = SimpleNamespace(n=structure[0], m=structure[1]) if structure is not None and reselect else None

    def add_batch(self, inp, out) -> None:
        self.stats.add_batch(inp)

    def reduce(self, dist) -> None:
        self.stats.reduce(dist)

    def compress(self, weight: torch.Tensor) -> CompressedWeight:
        d = self.d
        R = weight if d.U is None else weight - d.U.to(weight) @ d.V.to(weight).t()
        S, mask, info = None, d.mask, {"refit": "reselect" if self.reselect else "obs"}
        if bool(d.mask.any()):
            S, keep, _ = sparsegpt_prune(R, self.stats.gram, 0.0, blocksize=self.blocksize, percdamp=self.percdamp, keep_mask=d.mask,
                                         reselect=self.reselect, structure=self.structure)
            S, mask = S * keep, keep.to(d.mask.device)  # keep is d.mask unless reselect moved it
            if self.reselect:
                info["support_moved"] = float((mask & ~d.mask).sum()) / float(d.mask.sum())
            if self.iters > 0:
                before = float(support_objective(S, R, self.stats.gram).sum())
                S = refine_on_support(S, R, self.stats.gram, mask.to(S.device), self.iters, self.percdamp).to(S.dtype)
                after = float(support_objective(S, R, self.stats.gram).sum())
                info.update({"refit": f"{info['refit']}+cg{self.iters}", "output_error_obs": before, "output_error_cg": after})
        elif d.U is None:  # the allocation kept nothing of this matrix
            S = torch.zeros_like(weight)
        return CompressedWeight(S=S, mask=mask if S is not None else None, U=d.U, V=d.V, info=info)

    def free(self) -> None:
        self.stats.free()


class _RefitPass:
    """The layer-wise engine's view of a refit: one compressor per decided matrix.

    ``decide(name)`` builds a matrix's :class:`Decision` when its block is reached (from the
    Stage 1 cache and the stored mask), so only one block's decisions are ever in memory.
    """

    name = "cap-refit"
    needs_calibration = True

    def __init__(self, decide: Callable[[str], Decision], blocksize: int = 128, percdamp: float = 0.01, iters: int = 0, tune=None,
                 reselect: bool = False, structure: tuple[int, int] | None = None) -> None:
        self.decide, self.blocksize, self.percdamp, self.iters, self.reselect = decide, blocksize, percdamp, iters, reselect
        self.structure = structure
        self.block_tune = tune  # the engine trains each refitted block on its output (capllm.engine.block_tune)

    def layer_compressor(self, handle):
        return _RefitCompressor(handle.shape[1], handle.module.weight.device, self.decide(handle.name), self.blocksize, self.percdamp, self.iters,
                                self.reselect, self.structure)


def refit_layerwise(ctx, decisions: dict[str, Decision] | Callable[[str], Decision], blocksize: int = 128, percdamp: float = 0.01, iters: int = 0,
                    tune=None, reselect: bool = False, structure: tuple[int, int] | None = None) -> None:
    """Apply ``decisions`` (a dict, or a function of the linear's name) to ``ctx.model`` block by
    block with OBS-refitted sparse values (and ``iters`` CG steps towards the exact optimum on
    the support; with ``tune`` a :class:`~capllm.engine.block_tune.BlockTune`, each block's
    kept values are then trained on its output; with ``reselect`` the OBS pass re-chooses the
    entries at the decisions' per-column-block counts, or with an N:M ``structure (n, m)`` at their
    counts per row and group of ``m`` columns); resumable through the run's work directory.

    The model's linear weights must hold the original dense ``W`` when this is called.
    """
    decide = decisions.__getitem__ if isinstance(decisions, dict) else decisions
    run_layerwise(ctx, _RefitPass(decide, blocksize, percdamp, iters, tune, reselect, structure), checkpoint=ctx.checkpoint("cap-refit"), desc="CAP refit: blocks")
