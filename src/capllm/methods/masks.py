"""Mask selection shared by the pruning methods.

All functions take a score matrix ``(m, n)`` (higher = more important) and return a boolean
*keep* mask with an exact count: ties are broken by position (stable sort), so the number of
kept entries never drifts from the budget.
"""

from __future__ import annotations

import torch

from capllm.methods.base import Structure


def keep_top_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` highest scores of the whole matrix."""
    flat = score.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.view_as(score)


def prune_lowest_per_row(score: torch.Tensor, prune_per_row: int) -> torch.Tensor:
    """Remove the ``prune_per_row`` lowest scores of every row (Wanda's per-output comparison group)."""
    mask = torch.ones_like(score, dtype=torch.bool)
    if prune_per_row > 0:
        idx = torch.sort(score, dim=1, stable=True).indices[:, :prune_per_row]
        mask.scatter_(1, idx, False)
    return mask


def keep_nm(score: torch.Tensor, structure: Structure) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive input columns."""
    rows, cols = score.shape
    if cols % structure.m:
        raise ValueError(f"{cols} input features are not divisible by M={structure.m}")
    groups = score.reshape(rows, cols // structure.m, structure.m)
    idx = torch.topk(groups, structure.n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def keep_per_row_filled(score: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly ``k`` entries, spread as evenly as possible over the rows.

    Every row keeps its ``q = ⌊k/m⌋`` highest scores; the remaining ``e = k − q·m`` entries go to
    the ``e`` rows whose next-best (``(q+1)``-th) score is highest. Ties break by position exactly
    as in :func:`prune_lowest_per_row` (so ``k = m·q`` gives the same mask).
    """
    rows, cols = score.shape
    k = max(0, min(k, rows * cols))
    q, e = divmod(k, rows)
    if e == 0:
        return prune_lowest_per_row(score, cols - q)
    order = torch.sort(score, dim=1, stable=True).indices  # ascending
    mask = torch.zeros_like(score, dtype=torch.bool)
    if q:
        mask.scatter_(1, order[:, cols - q :], True)
    nxt = order[:, cols - q - 1]
    nxt_score = score.gather(1, nxt.unsqueeze(1)).squeeze(1)
    chosen = torch.sort(nxt_score, descending=True, stable=True).indices[:e]
    mask[chosen, nxt[chosen]] = True
    return mask
