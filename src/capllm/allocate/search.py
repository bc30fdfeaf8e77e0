"""A search over per-block budgets, scored by the calibration loss (issue 13, idea 2; as EvoPress does).

The paper's Stage 2 learns the allocation by REINFORCE over every candidate; at 10⁸ Bernoulli
variables and four samples its gradient is noise (SNR ≈ 1, BENCHMARKS.md). This is the other
route the issue names: a (1 + 1) evolutionary search over a few variables — one budget offset per
decoder block — around the chosen allocation (the global selection, or the guard's pick),
scored by the loss of the whole masked model:

* state: ``δ_b`` parameters added to block ``b`` (``Σ_b δ_b = 0``, so the budget is unchanged);
  block ``b``'s matrices give in proportion to what they keep and take in proportion to their
  room in the pool (:func:`level_share`), each filled by its own keys (:func:`~capllm.allocate.final_mask.greedy_fill`);
* mutation (EvoPress's level switch): two blocks ``a ≠ b`` drawn at random, ``Δ = step ·
  min(numel_a, numel_b)`` parameters move from ``a`` to ``b`` (skipped if ``a`` holds less or
  ``b``'s pool cannot take them: the offsets stay on the step's grid);
* fitness: ``ℓ(δ)`` — the mean next-token NLL of ``search_windows`` calibration windows with
  every linear at Stage 1's values of its kept candidates (:func:`capllm.allocate.guard.masked_loss`);
  the offspring replaces the parent when its loss is strictly lower;
* the check: the search's fitness windows are calibration windows, so its result is applied only
  if it also lowers the loss on the guard's **held-out** windows, which the search never saw.

Deterministic for a seed (and so a killed run redoes it to the same result); only one matrix's
keys and masks are in memory at a time, the candidate masks are files of the run's store.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from capllm.allocate.final_mask import greedy_fill
from capllm.errors import CapllmError


@dataclass(frozen=True)
class SearchConfig:
    evaluations: int  # offspring scored
    step: float  # Δ as a fraction of the smaller block's parameters
    seed: int = 0
    check: bool = True  # apply the result only if the held-out loss agrees (False: apply it regardless, to measure the check)


def level_search(block_sizes: list[int], lo: list[int], hi: list[int], fitness: Callable[[list[int], tuple[int, int]], float],
                 cfg: SearchConfig, on_accept: Callable[[list[int], tuple[int, int]], None] | None = None,
                 progress: bool = False) -> tuple[list[int], list[dict]]:
    """(1 + 1) search over integer offsets ``δ`` with ``Σ δ = 0`` and ``lo_b ≤ δ_b ≤ hi_b``.

    ``fitness(δ, (a, b))`` scores a candidate whose blocks ``a`` (gave) and ``b`` (took) differ
    from the current best; the first call, ``fitness([0, ...], (-1, -1))``, scores the start.
    ``on_accept(δ, (a, b))`` is told when a candidate becomes the best.
    Returns the best offsets and the curve (one record per evaluation)."""
    nb = len(block_sizes)
    if nb < 2:
        raise CapllmError("the budget search needs at least two decoder blocks")
    if not all(lo_b <= 0 <= hi_b for lo_b, hi_b in zip(lo, hi)):
        raise CapllmError("the budget search's bounds must contain the start (δ = 0)")
    rng = random.Random(cfg.seed)
    best = [0] * nb
    best_loss = fitness(best, (-1, -1))
    curve = [{"eval": 0, "loss": best_loss, "best": best_loss, "accepted": True}]
    for e in tqdm(range(1, cfg.evaluations + 1), desc="CAP stage 2: budget search", unit="eval", disable=not progress):
        a, b = rng.sample(range(nb), 2)
        d = int(cfg.step * min(block_sizes[a], block_sizes[b]))
        if d <= 0 or best[a] - d < lo[a] or best[b] + d > hi[b]:
            curve.append({"eval": e, "loss": None, "best": best_loss, "accepted": False, "skipped": f"blocks {a}->{b} at their bounds"})
            continue
        cand = list(best)
        cand[a] -= d
        cand[b] += d
        loss = fitness(cand, (a, b))
        ok = loss < best_loss
        if ok:
            best, best_loss = cand, loss
            if on_accept is not None:
                on_accept(cand, (a, b))
        curve.append({"eval": e, "from": a, "to": b, "moved": d, "loss": loss, "best": best_loss, "accepted": ok})
    return best, curve


def level_share(base: int, pool: int, block_base: int, block_room: int, delta: int) -> int:
    """Matrix ``k``'s count at its block's offset ``δ``: a block that gives (``−n_b ≤ δ < 0``) takes
    from each matrix in proportion to what it keeps, ``n_k + ⌊δ n_k / n_b⌋``; a block that takes
    (``0 < δ ≤ R_b``) gives each matrix in proportion to its room in the pool,
    ``n_k + ⌊δ (P_k − n_k) / R_b⌋`` with ``R_b = Σ_{k ∈ b} (P_k − n_k)``. No count leaves
    ``[0, P_k]`` and the floors only lower a count, so the model never exceeds its budget."""
    if delta < 0 and block_base > 0:
        return max(0, base + (delta * base) // block_base)
    if delta > 0 and block_room > 0:
        return min(pool, base + (delta * (pool - base)) // block_room)
    return base


def search_budgets(run, sel: dict, cfg: SearchConfig, windows: torch.Tensor, held: torch.Tensor | None, held_start: float | None) -> tuple[dict, dict]:
    """Search the per-block budgets around the current mask (module docstring) and apply the result
    if it lowers the held-out loss. Returns ``(selection, search record)``; resumable (the record is
    written before the masks are applied, and the search itself is deterministic)."""
    if held is None or len(held) == 0:
        raise CapllmError("cap option search needs held-out calibration windows to check its result (guard_windows ≥ 1)")
    store = run.store
    info = store.stage("search") or run._on_main(lambda: _search(run, cfg, windows, held, held_start), "search")
    if info["applied"]:
        sel = store.stage("search-applied") or run._on_main(lambda: run._apply_alternative("search", sel["budget"]["target"], stage="search-applied"),
                                                           "search-applied")
    return sel, info


def _search(run, cfg: SearchConfig, windows: torch.Tensor, held: torch.Tensor, held_start: float | None) -> dict:
    from capllm.allocate.guard import masked_loss
    from capllm.allocate.run import _costs

    ctx, store = run.ctx, run.store
    linears = ctx.linears
    run._segs = segs = run.segments()
    by_block: dict[int, list[int]] = {}
    for k, h in enumerate(linears):
        by_block.setdefault(h.block_index, []).append(k)
    blocks = sorted(by_block)
    base, pool = {}, {}
    with ctx.timer.stage("search"):
        for k, h in enumerate(linears):  # the start: the current mask, copied to the search's own mask set
            c, keep = _costs(segs[k]), store.keep(h.name)
            base[k], pool[k] = int(c[keep].sum()), int(c.sum())
            store.save_keep(h.name, keep, kind="keep-search")
        block_base = [sum(base[k] for k in by_block[b]) for b in blocks]
        block_size = [sum(linears[k].numel for k in by_block[b]) for b in blocks]
        hi = [sum(pool[k] - base[k] for k in by_block[b]) for b in blocks]
        lo = [-n for n in block_base]

        def write_candidate(delta: list[int], changed) -> None:
            for j in changed:
                for k in by_block[blocks[j]]:
                    share = level_share(base[k], pool[k], block_base[j], hi[j], delta[j])
                    store.save_keep(linears[k].name, greedy_fill(run.load_key(k), _costs(segs[k]), share), kind="keep-cand")

        changed_now: set[int] = set()
        cache = store.root / "search-hidden"  # the current best's input to every block, on disk
        cache.mkdir(parents=True, exist_ok=True)
        first = {"block": 0}

        def kind_of(name: str) -> str:
            return "keep-cand" if run.handles[name].block_index in changed_now else "keep-search"

        def keep_input(tag: str):
            def save(i: int, hidden: list[torch.Tensor]) -> None:
                if i > first["block"] or tag == "best":
                    torch.save(hidden, cache / f"{tag}-{i}.pt")
            return save

        def fitness(delta: list[int], pair: tuple[int, int]) -> float:
            """Blocks before the first changed one run as for the best: start from its saved input."""
            changed_now.clear()
            if pair[0] < 0:
                first["block"] = 0
                return masked_loss(ctx, lambda n: run.decision(n, kind="keep-search"), windows, on_block_input=keep_input("best"))
            for f in cache.glob("cand-*.pt"):  # a rejected candidate's inputs
                f.unlink()
            write_candidate(delta, pair)
            changed_now.update(blocks[j] for j in pair)
            first["block"] = i0 = min(changed_now)
            return masked_loss(ctx, lambda n: run.decision(n, kind=kind_of(n)), windows, start=i0,
                               start_hidden=torch.load(cache / f"best-{i0}.pt") if i0 else None, on_block_input=keep_input("cand"))

        def accept(delta: list[int], pair: tuple[int, int]) -> None:
            for j in pair:  # the candidate's masks, as scored, become the best's
                for k in by_block[blocks[j]]:
                    store.save_keep(linears[k].name, store.keep(linears[k].name, kind="keep-cand"), kind="keep-search")
            for f in cache.glob("cand-*.pt"):  # the blocks after the first changed one now see the candidate's inputs
                f.replace(cache / f.name.replace("cand-", "best-"))

        best, curve = level_search(block_size, lo, hi, fitness, cfg, on_accept=accept, progress=ctx.progress)
        changed_now.clear()
        shutil.rmtree(cache, ignore_errors=True)
        moved = any(best)
        held_search = masked_loss(ctx, lambda n: run.decision(n, kind="keep-search"), held) if moved else None
        if held_start is None and moved:
            held_start = masked_loss(ctx, run.decision, held)
    applied = moved and (held_search < held_start or not cfg.check)
    info = {"evaluations": cfg.evaluations, "step": cfg.step, "seed": cfg.seed, "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
            "fit_start": curve[0]["loss"], "fit_best": min(r["best"] for r in curve), "accepted": sum(1 for r in curve[1:] if r["accepted"]),
            "held_out_start": held_start, "held_out_search": held_search, "checked": cfg.check, "applied": bool(applied),
            "offsets": {str(b): d for b, d in zip(blocks, best) if d},
            "measured_on": "fitness: calibration windows; check: the guard's held-out windows; Stage 1 values before the refit",
            "curve": curve}
    store.finish_stage("search", info)
    return info
