"""CAP's final mask (arXiv 2505.03801, §3.2 "final mask") computed one matrix at a time.

CAP ranks every candidate of the model — a singular direction of an ``m × n`` matrix costs
``m + n`` parameters, a sparse entry costs 1 — by a key ``s ≥ 0`` (value per cost) and walks the
ranking (key descending, ties by global index ascending: matrix order, then position), keeping
each candidate whose cost still fits in the budget ``K``. :func:`capllm.allocate.final_mask.greedy_fill`
does this with one global sort over 10^8–10^10 candidates; here the same mask is found from the
per-matrix key arrays, each loaded (possibly from disk) once per pass and dropped, with memory
``O(largest matrix) + O(max direction cost · log)`` and no global sort.

The math. Let ``c_1, c_2, …`` be the (allowed) candidates in rank order and ``j`` the first
position with ``Σ_{i ≤ j} cost(c_i) > K`` (the *boundary*; if there is none, everything is kept).
The walk keeps ``c_1 … c_{j−1}`` (each still fits), skips ``c_j`` and continues with
``rest = K − Σ_{i<j} cost(c_i) < cost(c_j)``.

1. *The boundary without a sort.* For ``s ≥ 0`` the float32 bit pattern read as int32 is monotone
   in ``s`` (``−0.0`` is normalised to ``+0.0``; NaN and negatives are rejected). Pass 1 builds the
   cost-weighted histogram (exact int64) of the high 16 bits, pass 2 that of the low 16 bits inside
   the bin that holds the ``K``-th unit of cost; together they give the exact key ``v`` with
   ``cost(s > v) ≤ K < cost(s ≥ v)``, so ``c_j`` has key ``v``. Pass 3 walks the ties ``s = v`` in
   global order with the running cost ``cost(s > v) + …`` and finds ``c_j`` (the first that does
   not fit). The kept prefix is ``{s > v} ∪ {s = v, before c_j}``.
2. *The remainder needs only a few candidates per cost class.* After the boundary the walk is the
   same greedy walk with budget ``rest`` over the later candidates. A candidate of cost ``c`` is
   skipped iff ``c >`` what is left, and what is left never grows; so if one of cost ``c`` is
   skipped every later one of cost ``c`` is too. Since kept costs sum to ``≤ rest``, at most
   ``⌊rest / c⌋`` of cost ``c`` are kept, hence the walk reaches and skips every candidate of cost
   ``c`` beyond the first ``⌊rest / c⌋`` of that class (in rank order), and every candidate of cost
   ``> rest``. Removing candidates that the walk skips leaves the walk unchanged (they change
   neither the order of the others nor what is left). So it suffices to collect, per matrix and
   cost class (directions / entries), the first ``⌊R / c⌋`` after the boundary for any
   ``R ≥ rest`` — we use ``R = min(K − cost(s > v), max cost − 1)``, known before pass 3 —, merge
   them (truncating per class again as they accumulate), sort that short list by (key desc, global
   index asc) and run the sequential walk on it (:func:`fill_remainder`). Pass 4 hands every matrix
   its mask: prefix ∪ its share of the remainder.

With an ``allowed`` mask the same holds with the ranking restricted to allowed candidates.
:func:`streamed_bounded` adds CAP's per-matrix floor and cap (as :func:`bounded_fill`): each
matrix's own ranking is a per-matrix sort, its mandatory prefix (cost ``≤ floor``) and eligible
prefix (cost ``≤ cap``) are remembered by their last member, and the streamed walk runs over
eligible-and-not-mandatory candidates with the budget left after the floors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from capllm.allocate.final_mask import fill_remainder

_HI = 1 << 15  # high 16 bits of a non-negative int32
_LO = 1 << 16  # low 16 bits


@dataclass(frozen=True)
class Segment:
    """One matrix's candidates: `size` of them; the first `rank` cost `direction_cost` each, the rest cost 1."""
    size: int
    rank: int
    direction_cost: int

    def __post_init__(self):
        if not (0 <= self.rank <= self.size) or self.direction_cost < 1:
            raise ValueError(f"bad segment {self}: need 0 ≤ rank ≤ size and direction_cost ≥ 1")

    def cost(self, device=None) -> torch.Tensor:
        c = torch.ones(self.size, dtype=torch.int64, device=device)
        c[: self.rank] = self.direction_cost
        return c


def _bits(key: torch.Tensor, seg: Segment, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated key (−0.0 → +0.0) and its bit pattern as int32 (monotone for keys ≥ 0)."""
    if key.dtype != torch.float32 or key.shape != (seg.size,):
        raise ValueError(f"load_key({k}) must give float32 of shape ({seg.size},), got {key.dtype} {tuple(key.shape)}")
    if not bool((key >= 0).all()):
        raise ValueError(f"load_key({k}) has negative or NaN keys")
    key = key + 0.0  # −0.0 + 0.0 = +0.0
    return key, key.view(torch.int32)


def _hist(hist: torch.Tensor, bins: torch.Tensor, sel: torch.Tensor | None, seg: Segment) -> None:
    """Add the exact cost-weighted histogram of ``bins`` over the selected candidates to ``hist`` (int64, CPU)."""
    d, e = bins[: seg.rank], bins[seg.rank:]
    if sel is not None:
        d, e = d[sel[: seg.rank]], e[sel[seg.rank:]]
    for part, weight in ((d, seg.direction_cost), (e, 1)):
        if part.numel() < hist.numel() // 8:  # few candidates: scatter, no dense per-matrix histogram
            part = part.cpu().long()
            hist.index_add_(0, part, torch.ones(1, dtype=torch.int64).expand(part.numel()), alpha=weight)
        elif part.numel():
            hist += weight * torch.bincount(part, minlength=hist.numel()).cpu()


def _last_above(h: torch.Tensor, base: int, budget: int) -> tuple[int, int]:
    """Largest bin ``b`` with ``base + cost(bins ≥ b) > budget``, and ``base + cost(bins > b)``."""
    suffix = base + torch.flip(torch.cumsum(torch.flip(h, [0]), 0), [0])
    b = int((suffix > budget).sum()) - 1
    return b, (int(suffix[b + 1]) if b + 1 < h.numel() else base)


def _first_in_rank(key: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (in no particular order) of the first ``n`` of ``key`` in rank order (desc, index asc)."""
    if n >= key.numel():
        return torch.arange(key.numel(), device=key.device)
    if n <= 0:
        return torch.zeros(0, dtype=torch.int64, device=key.device)
    t = torch.topk(key, n, sorted=False).values.min()
    gt = torch.nonzero(key > t).squeeze(1)
    return torch.cat([gt, torch.nonzero(key == t).squeeze(1)[: n - gt.numel()]])


def _rank_sort(key: torch.Tensor, gidx: torch.Tensor) -> torch.Tensor:
    """Permutation by key descending, ties by global index ascending."""
    o = torch.argsort(gidx)
    return o[torch.argsort(key[o], descending=True, stable=True)]


def _compact(key, gidx, cost, R: int):
    """Rank-sorted, keeping per cost class ``c ≤ R`` only its first ``⌊R / c⌋`` (see the module doc)."""
    o = _rank_sort(key, gidx)
    key, gidx, cost = key[o], gidx[o], cost[o]
    classes, inv = torch.unique(cost, return_inverse=True)
    by_class = torch.argsort(inv, stable=True)  # grouped by class, rank order inside
    counts = torch.bincount(inv, minlength=classes.numel())
    start = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(inv)
    pos[by_class] = torch.arange(inv.numel()) - start[inv[by_class]]
    keep = pos < (R // classes)[inv]
    return key[keep], gidx[keep], cost[keep]


def _select(segments, load_key, budget: int, allowed, forced, store, bar) -> dict:
    """Core of both entry points; ``allowed(k, bits)`` / ``forced(k, bits)`` give bool masks or None."""
    budget = int(budget)
    if budget < 0:
        raise ValueError(f"budget {budget} < 0")
    offsets, o = [], 0
    for seg in segments:
        offsets.append(o)
        o += seg.size
    passes = 0

    def sweep():
        nonlocal passes
        passes += 1
        for k, seg in enumerate(segments):
            key, bits = _bits(load_key(k), seg, k)
            a = allowed(k, bits) if allowed is not None else None
            if a is not None and (a.dtype != torch.bool or a.shape != (seg.size,)):
                raise ValueError(f"allowed({k}) must be a bool mask of shape ({seg.size},)")
            yield k, seg, key, bits, a
            bar.update(1)

    hist = torch.zeros(_HI, dtype=torch.int64)
    for k, seg, key, bits, a in sweep():  # pass 1: high 16 bits
        _hist(hist, bits >> 16, a, seg)
    total = int(hist.sum())
    diag = {"threshold": float("-inf"), "spent": total, "passes": 0, "candidates": o, "remainder_filled": 0, "boundary": -1}
    fill = torch.zeros(0, dtype=torch.int64)
    if total > budget:
        hi, base = _last_above(hist, 0, budget)
        hist = torch.zeros(_LO, dtype=torch.int64)
        for k, seg, key, bits, a in sweep():  # pass 2: low 16 bits inside the boundary's bin
            sel = (bits >> 16) == hi
            _hist(hist, bits & 0xFFFF, sel if a is None else sel & a, seg)
        lo, cost_gt = _last_above(hist, base, budget)
        v = (hi << 16) | lo
        max_cost = max([s.direction_cost for s in segments if s.rank > 0] + [1])
        R = min(budget - cost_gt, max_cost - 1)  # ≥ rest
        running, b_k, b_pos, spent = cost_gt, None, None, None
        pend, pend_n, base_n = [], 0, 0
        for k, seg, key, bits, a in sweep():  # pass 3: the boundary candidate; collect the remainder's candidates
            tie = bits == v
            after = bits < v
            if a is not None:
                tie &= a
                after &= a
            if b_k is None:
                tpos = torch.nonzero(tie).squeeze(1)
                if tpos.numel():
                    cost = torch.where(tpos < seg.rank, seg.direction_cost, 1).to(torch.int64)
                    cs = running + torch.cumsum(cost, 0)
                    over = torch.nonzero(cs > budget).squeeze(1)
                    if over.numel():
                        i = int(over[0])
                        b_k, b_pos, spent = k, int(tpos[i]), int(cs[i] - cost[i])
                        after[b_pos + 1:] |= tie[b_pos + 1:]
                    else:
                        running = int(cs[-1])
            else:
                after |= tie
            if R <= 0:
                continue
            for lo_, hi_, c in ((0, seg.rank, seg.direction_cost), (seg.rank, seg.size, 1)):
                if hi_ <= lo_ or c > R:
                    continue
                pos = torch.nonzero(after[lo_:hi_]).squeeze(1) + lo_
                pos = pos[_first_in_rank(key[pos], R // c)]
                pend.append((key[pos].cpu(), pos.cpu() + offsets[k], torch.full((pos.numel(),), c, dtype=torch.int64)))
                pend_n += pos.numel()
            if pend_n > 2 * (base_n + 2 * R + 2):
                pend = [_compact(*(torch.cat(x) for x in zip(*pend)), R)]
                pend_n = base_n = pend[0][0].numel()
        assert b_k is not None  # budget < cost(s ≥ v): some tie does not fit
        rest = budget - spent
        if pend:
            key_r, gidx_r, cost_r = (torch.cat(x) for x in zip(*pend))
            small = cost_r <= rest
            key_r, gidx_r, cost_r = _compact(key_r[small], gidx_r[small], cost_r[small], rest)
            keep_r = torch.zeros(key_r.numel(), dtype=torch.bool)
            left = fill_remainder(keep_r, cost_r, rest)
            fill = torch.sort(gidx_r[keep_r]).values
        else:
            left = rest
        threshold = float(torch.tensor([v], dtype=torch.int32).view(torch.float32))
        diag.update(threshold=threshold, spent=budget - left, remainder_filled=rest - left, boundary=offsets[b_k] + b_pos)
    for k, seg, key, bits, a in sweep():  # last pass: every matrix's mask
        if total <= budget:
            keep = a.clone() if a is not None else torch.ones(seg.size, dtype=torch.bool, device=key.device)
        else:
            keep = bits > v
            if k < b_k:
                keep |= bits == v
            elif k == b_k:
                keep[:b_pos] |= bits[:b_pos] == v
            if a is not None:
                keep &= a
            lo_i, hi_i = torch.searchsorted(fill, torch.tensor([offsets[k], offsets[k] + seg.size])).tolist()
            keep[(fill[lo_i:hi_i] - offsets[k]).to(key.device)] = True
        f = forced(k, bits) if forced is not None else None
        if f is not None:
            keep |= f
        store(k, keep)
    diag["passes"] = passes
    bar.total = bar.n  # fewer passes when everything fits
    bar.refresh()
    return diag


def _bar(progress: bool, desc: str, total: int):
    return tqdm(total=total, desc=desc, unit="matrix", disable=not progress)


def streamed_greedy(segments: list[Segment], load_key: Callable[[int], torch.Tensor], budget: int,
                    store: Callable[[int, torch.Tensor], None], allowed: Callable[[int], torch.Tensor | None] | None = None,
                    progress: bool = False, desc: str = "selection") -> dict:
    """:func:`greedy_fill` of the concatenated keys and costs, matrix by matrix (see the module doc).

    ``load_key(k)`` gives matrix ``k``'s keys (float32 ``≥ 0``, shape ``(size,)``) and is called once
    per pass (4 passes, 2 when everything allowed fits); ``allowed(k)`` an optional bool mask of the
    candidates that may be kept (the walk then runs over those only); ``store(k, keep)`` receives the
    final bool mask of every matrix, once each, in order. Returns diagnostics: ``threshold`` (key of
    the boundary candidate, ``-inf`` if none), ``spent`` (kept cost), ``passes``, ``candidates``,
    ``remainder_filled`` (cost kept after the boundary) and ``boundary`` (its global index, or -1).
    Raises ``ValueError`` for a negative budget and for NaN, negative or non-float32 keys.
    """
    bar = _bar(progress, desc, 4 * len(segments))
    try:
        wrapped = (lambda k, bits: allowed(k)) if allowed is not None else None
        return _select(segments, load_key, budget, wrapped, None, store, bar)
    finally:
        bar.close()


def _prefix(bits: torch.Tensor, last: tuple[int, int] | None) -> torch.Tensor:
    """The prefix of the matrix's own ranking that ends at ``last = (key bits, position)``."""
    if last is None:
        return torch.zeros(bits.numel(), dtype=torch.bool, device=bits.device)
    v, p = last
    m = bits > v
    m[: p + 1] |= bits[: p + 1] == v
    return m


def streamed_bounded(segments: list[Segment], load_key: Callable[[int], torch.Tensor], budget: int, floor: list[int], cap: list[int],
                     store: Callable[[int, torch.Tensor], None], progress: bool = False, desc: str = "selection") -> dict:
    """:func:`bounded_fill` with per-matrix ``floor`` / ``cap`` on the kept cost, matrix by matrix.

    Matrix ``k`` first keeps the prefix of its own ranking whose cost is ``≤ floor[k]``; the rest of
    the budget goes through :func:`streamed_greedy`'s walk over candidates inside the prefix of cost
    ``≤ cap[k]`` and not already kept. Raises ``ValueError`` when the floors exceed the budget.
    Diagnostics as :func:`streamed_greedy`, plus ``mandatory`` (the floors' cost; included in ``spent``).
    """
    if len(floor) != len(segments) or len(cap) != len(segments):
        raise ValueError("floor and cap need one entry per segment")
    bar = _bar(progress, desc, 5 * len(segments))
    try:
        bounds, mandatory = [], 0
        for k, seg in enumerate(segments):  # pass 0: each matrix's own ranking
            key, bits = _bits(load_key(k), seg, k)
            order = torch.argsort(key, descending=True, stable=True)
            cs = torch.cumsum(seg.cost(key.device)[order], 0)
            n_floor, n_cap = int((cs <= int(floor[k])).sum()), int((cs <= int(cap[k])).sum())
            mandatory += int(cs[n_floor - 1]) if n_floor else 0
            bounds.append(tuple((int(bits[order[n - 1]]), int(order[n - 1])) if n else None for n in (n_floor, n_cap)))
            del key, bits, order, cs
            bar.update(1)
        if mandatory > budget:
            raise ValueError("the per-segment floors exceed the budget")
        allowed = lambda k, bits: _prefix(bits, bounds[k][1]) & ~_prefix(bits, bounds[k][0])
        forced = lambda k, bits: _prefix(bits, bounds[k][0])
        diag = _select(segments, load_key, budget - mandatory, allowed, forced, store, bar)
    finally:
        bar.close()
    diag["spent"] += mandatory
    diag["passes"] += 1
    diag["mandatory"] = mandatory
    return diag
