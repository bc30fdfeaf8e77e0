"""The final deterministic mask: rank every candidate globally, keep greedily under the budget.

Candidates are ranked by their keep-probability ``s`` (ties broken by a secondary key, e.g. the
initial importance per unit cost). Walking down the ranking we keep each candidate whose cost
still fits: ``Σ c_k ≤ K`` always holds. Implemented in two vectorised passes: the prefix of the
ranking whose cumulative cost fits is kept outright; the remaining budget (smaller than the
first candidate that did not fit, i.e. under one singular direction) is then filled with the
best-ranked remaining candidates that fit — in practice sparse entries of cost 1 — so the
achieved count equals ``K`` to within the cost of the cheapest remaining candidate.
"""

from __future__ import annotations

import torch


def greedy_fill(s: torch.Tensor, c: torch.Tensor, budget: int, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean keep-mask with ``Σ c[mask] ≤ budget``, filled greedily in order of ``s`` (desc)."""
    if tiebreak is not None:
        # sort by the secondary key first, then stably by s: ties in s keep the secondary order
        order = torch.argsort(tiebreak, descending=True, stable=True)
        order = order[torch.argsort(s[order], descending=True, stable=True)]
    else:
        order = torch.argsort(s, descending=True, stable=True)
    cost = c[order].to(torch.int64)
    csum = torch.cumsum(cost, 0)
    keep_sorted = csum <= budget
    n_prefix = int(keep_sorted.sum())  # csum is increasing: the kept set is a prefix
    spent = int(csum[n_prefix - 1]) if n_prefix else 0
    rest = budget - spent
    # fill the remainder (smaller than the first candidate that did not fit): repeatedly take, in
    # rank order, the not-yet-kept candidates that fit, until nothing more fits
    while rest > 0:
        tail = torch.nonzero(~keep_sorted[n_prefix:] & (cost[n_prefix:] <= rest)).squeeze(1) + n_prefix
        if tail.numel() == 0:
            break
        take = tail[torch.cumsum(cost[tail], 0) <= rest]
        if take.numel() == 0:
            break
        keep_sorted[take] = True
        rest -= int(cost[take].sum())
    mask = torch.zeros_like(keep_sorted)
    mask[order] = keep_sorted
    return mask
