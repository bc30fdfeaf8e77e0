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
