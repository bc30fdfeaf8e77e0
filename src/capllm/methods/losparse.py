"""``losparse``: a one-shot adaptation of LoSparse (Li et al. 2023, arXiv 2306.11222).

LoSparse writes each weight as ``W = U Vᵀ + S``: the low-rank part is initialised from the top
singular directions of ``W`` and the sparse residual ``S = W − U Vᵀ`` is pruned *during
fine-tuning* by a sensitivity score with a cubic schedule. **This is an adaptation, not the
original**: there is no fine-tuning here, so the schedule collapses to one step and the
sensitivity ``|S_ij · ∂ℒ/∂S_ij|`` is replaced by the activation-aware magnitude
``|S_ij|·‖X_j‖₂`` (Wanda's score, ``‖X_j‖`` from ``E[x_j²]``):

1. ``L = U_r diag(σ_r) V_rᵀ`` — plain truncated SVD of ``W`` (LoSparse's initialisation);
2. ``S`` keeps the ``B − r(m + n)`` entries of ``W − L`` with the largest ``|·|·‖X_j‖`` in the whole
   matrix (LoSparse prunes each matrix's sparse part as one group), values unchanged.

Optional refinement (``iters > 1``, our addition standing in for the fine-tuning that lets the
low-rank part absorb what pruning removed): alternate ``L ← argmin_rank r ‖(W − S − L)D‖_F``
(SVD of ``(W − S)·D``, un-scaled; ``D = diag(‖X_j‖/√N)``) and step 2 on ``W − L``. Both steps
minimise the same diagonal activation error ``‖(W − L − S)D‖_F`` (the output error if inputs were
uncorrelated), so it never increases; ``info["errors"]`` lists it (relative to ``‖W D‖_F``)
after every iteration.

Budget: ``r = ⌊share·B/(m + n)⌋`` with ``share`` = ``rank_share`` (default 0.25: LoSparse's GLUE
recipe keeps 5 % of ``mn`` in the low-rank part and 15 % in the sparse part, i.e. a quarter of
the kept parameters are low-rank); the sparse part fills the rest, so kept = ``B = ⌊(1 − ρ)mn⌋``
exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from capllm.errors import CapllmError
from capllm.methods.base import CompressedWeight, Method, StatsCompressor, matrix_budget, register
from capllm.methods.lowrank import diag_weighted_error, fold, lowrank_plus_sparse, rank_at_budget, truncated_svd
from capllm.methods.masks import keep_top_k
from capllm.methods.oats import input_scale


def losparse_decompose(W: torch.Tensor, sq: torch.Tensor, r: int, keep: int, iters: int):
    """Returns ``(U, V, S, mask, errors)`` with σ folded into ``U, V``; see the module docstring."""
    d = input_scale(sq).to(W.device)
    U, s, V = truncated_svd(W, r)
    ref = max(diag_weighted_error(W, d.pow(2)), 1e-30)
    errors = []
    for t in range(iters):
        if t > 0:  # refit the low-rank part to what the sparse part leaves, in the D-weighted norm
            U, s, V = truncated_svd((W - S) * d.unsqueeze(0), r)
            V = V / d.unsqueeze(1)
        R = W - (U * s) @ V.t()
        mask = keep_top_k(R.abs() * d.unsqueeze(0), keep)
        S = R * mask
        errors.append(round(diag_weighted_error(R - S, d.pow(2)) / ref, 7))
    Uf, Vf = fold(U, s, V)
    return Uf, Vf, S, mask, errors


class _LoSparseCompressor(StatsCompressor):
    STATS = {"sq": True}

    def compress(self, weight: torch.Tensor) -> CompressedWeight:
        o = self.method.options
        m, n = weight.shape
        B = matrix_budget(m, n, self.method.ratio)
        r = rank_at_budget(m, n, o.rank_share * B)
        U, V, S, mask, errors = losparse_decompose(weight.float(), self.stats.sq, r, B - r * (m + n), o.iters)
        info = {"errors": errors}
        return lowrank_plus_sparse(weight.dtype, S, mask, U if r else None, V, info)


@register
class LoSparse(Method):
    name = "losparse"
    description = "one-shot LoSparse adaptation: SVD at a fixed rank share, prune the residual by |S|·‖X_j‖"

    @dataclass(frozen=True)
    class Options:
        rank_share: float = 0.25
        iters: int = 1

    def __init__(self, ratio, structure=None, options=None) -> None:
        super().__init__(ratio, structure, options)
        if not 0.0 <= self.options.rank_share <= 1.0:
            raise CapllmError(f"losparse: rank_share={self.options.rank_share} must be in [0, 1]")
        if self.options.iters < 1:
            raise CapllmError(f"losparse: iters={self.options.iters} must be at least 1")

    def layer_compressor(self, handle):
        return _LoSparseCompressor(handle.shape[1], handle.module.weight.device, self)
