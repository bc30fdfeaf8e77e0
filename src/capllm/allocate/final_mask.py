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


def rank_order(s: torch.Tensor, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """Indices by ``s`` descending; ties in ``s`` keep the order of ``tiebreak`` (descending)."""
    if tiebreak is None:
        return torch.argsort(s, descending=True, stable=True)
    order = torch.argsort(tiebreak, descending=True, stable=True)
    return order[torch.argsort(s[order], descending=True, stable=True)]


def fill_remainder(keep_sorted: torch.Tensor, cost: torch.Tensor, rest: int, allowed: torch.Tensor | None = None, start: int = 0) -> int:
    """Repeatedly take, in rank order, the not-yet-kept (and allowed) candidates that still fit.

    In place on ``keep_sorted`` (rank order); returns the budget left over.
    """
    while rest > 0:
        free = ~keep_sorted[start:] & (cost[start:] <= rest)
        if allowed is not None:
            free &= allowed[start:]
        cand = torch.nonzero(free).squeeze(1) + start
        if cand.numel() == 0:
            break
        take = cand[torch.cumsum(cost[cand], 0) <= rest]
        if take.numel() == 0:
            break
        keep_sorted[take] = True
        rest -= int(cost[take].sum())
    return rest


def greedy_fill(s: torch.Tensor, c: torch.Tensor, budget: int, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean keep-mask with ``Σ c[mask] ≤ budget``, filled greedily in order of ``s`` (desc)."""
    order = rank_order(s, tiebreak)
    cost = c[order].to(torch.int64)
    csum = torch.cumsum(cost, 0)
    keep_sorted = csum <= budget
    n_prefix = int(keep_sorted.sum())  # csum is increasing: the kept set is a prefix
    spent = int(csum[n_prefix - 1]) if n_prefix else 0
    # the remainder is smaller than the first candidate that did not fit
    fill_remainder(keep_sorted, cost, budget - spent, start=n_prefix)
    mask = torch.zeros_like(keep_sorted)
    mask[order] = keep_sorted
    return mask


def bounded_fill(s: torch.Tensor, c: torch.Tensor, budget: int, segment: torch.Tensor, floor: torch.Tensor, cap: torch.Tensor,
                 tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy fill in order of ``s`` with a per-segment (per-matrix) floor and cap on the kept cost.

    Segment ``g`` first keeps its own best candidates while their cost stays ``≤ floor[g]``; the
    rest of the budget then goes, in global order of ``s``, to candidates whose segment has not
    reached ``cap[g]`` (a candidate is eligible when the cost of it and of every better candidate
    of its segment is ``≤ cap[g]``). ``floor = 0, cap = ∞`` is :func:`greedy_fill`.
    """
    order = rank_order(s, tiebreak)
    cost = c[order].to(torch.int64)
    seg = segment[order]
    # cumulative cost inside each segment, in rank order: group by segment (stable keeps rank order)
    by_seg = torch.argsort(seg, stable=True)
    cs = torch.cumsum(cost[by_seg], 0)
    seg_total = torch.bincount(seg, weights=cost.double(), minlength=int(segment.max()) + 1).long()
    starts = torch.cumsum(seg_total, 0) - seg_total  # exclusive prefix: cost of earlier segments
    within = torch.empty_like(cs)
    within[by_seg] = cs - starts[seg[by_seg]]
    mandatory = within <= floor.to(torch.int64)[seg]
    eligible = within <= cap.to(torch.int64)[seg]
    rest = budget - int(cost[mandatory].sum())
    if rest < 0:
        raise ValueError("the per-segment floors exceed the budget")
    keep_sorted = mandatory.clone()
    fill_remainder(keep_sorted, cost, rest, allowed=eligible)
    mask = torch.zeros_like(keep_sorted)
    mask[order] = keep_sorted
    return mask
