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


def _top_per_row(score: torch.Tensor, q: int):
    """``(mask, v, last)`` for ``1 ≤ q ≤ cols``: the mask of every row's ``q`` highest scores (ties
    to the later column), each row's ``q``-th highest score ``v (rows, 1)``, and the column of the
    lowest-ranked kept entry ``last (rows,)`` (the leftmost kept entry equal to ``v``)."""
    cols = score.shape[1]
    v = torch.kthvalue(score, cols - q + 1, dim=1, keepdim=True).values
    mask = score > v
    tie = score == v
    need = q - mask.sum(1, keepdim=True)  # ≥ 1: v itself is one of the q highest
    # how many tied entries stand at this column or to its right; keep those within `need`
    right = tie.flip(1).cumsum(1, dtype=torch.int32).flip(1)
    keep_tie = tie & (right <= need)
    last = (tie & (right == need)).to(torch.uint8).argmax(1)
    return mask | keep_tie, v, last


def keep_top_per_row(score: torch.Tensor, q: int) -> torch.Tensor:
    """Keep the ``q`` highest scores of every row; among equal scores the later column wins.

    That is the mask of a stable ascending sort's last ``q`` columns, found without the sort:
    ``v`` = each row's ``q``-th highest score (one ``kthvalue``), keep every entry above ``v`` and,
    of the entries equal to ``v``, the rightmost ``q − #{> v}`` (1.5× faster than the stable sort
    on a 8960 × 1536 matrix at one thread; OATS runs it every iteration). ``score`` must be finite (a weight-derived score is).
    """
    rows, cols = score.shape
    q = max(0, min(int(q), cols))
    if q == 0 or q == cols or rows == 0:
        return torch.full_like(score, q == cols, dtype=torch.bool)
    return _top_per_row(score, q)[0]


def prune_lowest_per_row(score: torch.Tensor, prune_per_row: int) -> torch.Tensor:
    """Remove the ``prune_per_row`` lowest scores of every row (Wanda's per-output comparison group)."""
    return keep_top_per_row(score, score.shape[1] - max(0, prune_per_row))


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
    if e == 0 or rows == 0:
        return keep_top_per_row(score, q)
    # rows keep q + 1 entries; all but the e rows with the highest (q+1)-th score drop that entry
    mask, v, last = _top_per_row(score, q + 1)
    drop = torch.sort(v.squeeze(1), descending=True, stable=True).indices[e:]
    mask[drop, last[drop]] = False
    return mask
