"""``cap``: global rank-and-sparsity allocation (Zhou et al., arXiv 2505.03801, ICLR 2026).

Stage 1 — robust PCA of every decoder linear, ``W = U diag(σ) Vᵀ + S``
(:mod:`capllm.decompose`; cached and resumable). Stage 2 — every singular direction (cost
``m + n``) and every non-zero of ``S`` (cost 1), across **all** matrices, is a candidate of one
pool (:mod:`capllm.allocate.pools`); a Bernoulli policy over them starts from activation-aware
scores (:mod:`capllm.allocate.scores`) and is trained by REINFORCE on the loss of the whole
masked model (:mod:`capllm.allocate.policy`; ``steps=0``, the measured default, keeps the
ranking of the initial scores) under the budget
``Σ c_k s_k = K = ⌊(1 − ρ) · Σ m n⌋``; the final mask ranks all candidates by ``s`` and keeps
greedily while the cost stays ``≤ K`` (:mod:`capllm.allocate.final_mask`).

Also here, the paper's two ablations on the same pools:

* ``cap-uniform`` — each matrix gets the same share ``⌊(1 − ρ) m n⌋`` of the budget, filled
  greedily by the same scores (no global allocation);
* ``rpca-threshold`` — no Stage 2: global hand thresholds on ``σ`` and ``|S|`` with a fixed
  split of the budget between directions and entries (``rank_share``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from capllm.allocate.final_mask import bounded_fill, greedy_fill
from capllm.allocate.policy import PolicyConfig, run_policy
from capllm.allocate.pools import CandidatePools, MatrixPool
from capllm.allocate.refit import Decision, refit_layerwise
from capllm.allocate.scores import initial_probabilities, value_per_cost
from capllm.allocate.stage1 import Stage1Options, collect_grams, collect_output_grad_sq, stage1_pools
from capllm.errors import CapllmError
from capllm.methods.base import CompressedWeight, Method, register


@dataclass(frozen=True)
class CapOptions(Stage1Options):
    # initial scores
    score: str = "fisher"  # fisher | activation | magnitude | constant
    normalize: str = "auto"  # matrix | none | auto (none for fisher, whose scores are in loss units; else matrix)
    temperature: float = 0.5
    # policy (paper: 3 steps, lr 0.05, moving-average baseline over 5). Measured default 0: on
    # SmolLM2-135M at 50 % three steps of 4 masks have gradient SNR ≈ 1 (noise), move 0.06 % of
    # the budget and leave perplexity unchanged (50.01 vs 49.79) for +500 s (BENCHMARKS.md)
    steps: int = 0
    samples: int = 4
    lr: float = 0.05
    baseline: str = "moving"  # moving | loo
    antithetic: bool = False
    loss: str = "lm"  # lm (cross-entropy of the whole masked model) | recon (layer-output error)
    policy_windows: int = 8  # calibration windows scored per mask (lm loss)
    granularity: str = "candidate"  # candidate | group
    groups_per_matrix: int = 32
    # our addition: each matrix keeps a fraction within (1 − ρ)·[1 − spread, 1 + spread] of its
    # parameters (0 = the uniform split, inf = the paper's unconstrained global ranking)
    spread: float = float("inf")
    seed: int = 0
    # our addition: reconstruct the kept sparse values on the chosen support (none = the paper)
    refit: str = "obs"  # obs | none


def _normalize(o) -> str:
    return ("none" if o.score == "fisher" else "matrix") if o.normalize == "auto" else o.normalize


def _statistics(ctx, o) -> tuple[dict | None, dict | None]:
    """Input second moments (full when a score or loss needs them) and output-gradient moments."""
    grams = collect_grams(ctx, full=o.score in ("activation", "fisher") or getattr(o, "loss", "") == "recon") if (o.score != "constant" or o.act_aware or getattr(o, "loss", "") == "recon") else None
    gsq = collect_output_grad_sq(ctx) if o.score == "fisher" else None
    return grams, gsq


def _budget(pools: CandidatePools, ratio: float) -> int:
    return int((1.0 - ratio) * pools.dense_params)


def fill(pools: CandidatePools, s: torch.Tensor, cost: torch.Tensor, budget: int, ratio: float, spread: float,
         tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """The final mask: global greedy fill, or with per-matrix bounds when ``spread`` is finite."""
    if spread < 0:
        raise CapllmError(f"cap option spread={spread}: must be ≥ 0 (inf = unconstrained)")
    if spread == float("inf"):
        return greedy_fill(s, cost, budget, tiebreak=tiebreak)
    sizes = torch.tensor([p.size for p in pools.matrices])
    segment = torch.repeat_interleave(torch.arange(len(pools.matrices)), sizes)
    dense = torch.tensor([p.shape[0] * p.shape[1] for p in pools.matrices], dtype=torch.float64)
    keep_frac = 1.0 - ratio
    floor = (dense * keep_frac * max(0.0, 1.0 - spread)).floor()
    cap = (dense * min(1.0, keep_frac * (1.0 + spread))).floor()
    return bounded_fill(s, cost, budget, segment, floor, cap, tiebreak=tiebreak)


def _check_budget(pools: CandidatePools, budget: int) -> None:
    if pools.pool_cost <= budget:
        raise CapllmError(f"the Stage 1 pools cost {pools.pool_cost:,} ≤ budget {budget:,}: nothing to choose; use a higher --ratio or a larger --option lam_scale")


def _allocation(pools: CandidatePools, keep: torch.Tensor, budget: int) -> list[dict]:
    rows = []
    for p in pools.matrices:
        seg = keep[p.offset : p.offset + p.size]
        r, e = int(seg[: p.rank].sum()), int(seg[p.rank :].sum())
        kept = r * p.direction_cost + e
        m, n = p.shape
        rows.append({"name": p.name, "shape": [m, n], "rank_pool": p.rank, "nnz_pool": p.nnz, "rank_kept": r, "nnz_kept": e,
                     "kept_params": kept, "kept_fraction": round(kept / (m * n), 6), "budget_share": round(kept / budget, 6)})
    return rows


def apply_mask(ctx, pools: CandidatePools, keep: torch.Tensor, refit: str = "none") -> None:
    """Write the selected factors and entries into the model (one module per matrix).

    ``refit="obs"`` re-solves the kept sparse values layer by layer (:mod:`capllm.allocate.refit`);
    the model must then still hold its original weights.
    """
    decisions = {}
    for p in pools.matrices:
        U, V, S = p.compose(keep[p.offset : p.offset + p.size])
        mask = torch.zeros(p.shape, dtype=torch.bool) if S is None else S != 0
        decisions[p.name] = Decision(U, V, S, mask)
    if refit == "obs":
        refit_layerwise(ctx, decisions)
        return
    if refit != "none":
        raise CapllmError(f"cap option refit={refit!r}: use obs or none")
    handles = {h.name: h for h in ctx.linears}
    for name, d in decisions.items():
        S = d.S if d.S is not None or d.U is not None else torch.zeros(d.mask.shape)
        ctx.apply(handles[name], CompressedWeight(S=S, mask=d.mask if S is not None else None, U=d.U, V=d.V))


def _groups(pools: CandidatePools, cost: torch.Tensor, key: torch.Tensor, per_matrix: int) -> torch.Tensor:
    """Unit id of every candidate: each matrix's candidates, ranked by ``key``, cut into groups of equal cost."""
    unit = torch.empty(pools.size, dtype=torch.int64)
    base = 0
    for p in pools.matrices:
        sl = slice(p.offset, p.offset + p.size)
        order = torch.argsort(key[sl], descending=True, stable=True)
        c = cost[sl][order].double()
        before = torch.cumsum(c, 0) - c
        g = (before / (c.sum() / per_matrix)).floor().clamp_max(per_matrix - 1).long()
        unit[sl] = torch.empty_like(g).scatter_(0, order, g) + base
        base += per_matrix
    return unit


class _LMLoss:
    """Cross-entropy of the whole model with every matrix set to its masked ``W̃``."""

    def __init__(self, ctx, pools: CandidatePools, windows: torch.Tensor) -> None:
        self.ctx, self.pools, self.windows = ctx, pools, windows
        self.handles = {h.name: h for h in ctx.linears}

    @torch.no_grad()
    def restore(self) -> None:
        """Put ``W = L + S`` (the dense weights, to the RPCA tolerance) back into the model."""
        for p in self.pools.matrices:
            self.handles[p.name].set_weight(p.dense(torch.ones(p.size, dtype=torch.bool)))

    @torch.no_grad()
    def __call__(self, keep: torch.Tensor) -> float:
        for p in self.pools.matrices:
            self.handles[p.name].set_weight(p.dense(keep[p.offset : p.offset + p.size]))
        model, dev = self.ctx.model, self.ctx.device
        model.to(dev)
        total, count = 0.0, 0
        for w in self.windows:
            x = w.unsqueeze(0).to(dev)
            logits = model(x, use_cache=False).logits[0, :-1].float()
            total += float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))
            count += x.shape[1] - 1
        return total / count


class _ReconLoss:
    """Mean over matrices of the relative layer-output error ``tr(ΔW C ΔWᵀ) / tr(W C Wᵀ)``."""

    def __init__(self, pools: CandidatePools, originals: dict[str, torch.Tensor], grams: dict[str, torch.Tensor]) -> None:
        self.pools, self.W, self.C = pools, originals, grams
        self.norm = {p.name: float(((self.W[p.name] @ self.C[p.name]) * self.W[p.name]).sum()) for p in pools.matrices}

    @torch.no_grad()
    def __call__(self, keep: torch.Tensor) -> float:
        tot = 0.0
        for p in self.pools.matrices:
            d = self.W[p.name] - p.dense(keep[p.offset : p.offset + p.size])
            tot += float(((d @ self.C[p.name]) * d).sum()) / max(self.norm[p.name], 1e-30)
        return tot / len(self.pools.matrices)


@register
class Cap(Method):
    name = "cap"
    description = "RPCA pools + global Bernoulli-policy allocation of rank and sparsity (Zhou et al. 2025)"
    Options = CapOptions

    def compress_model(self, ctx) -> None:
        o = self.options
        if ctx.calibration is None:
            raise CapllmError("cap needs calibration data")
        with ctx.timer.stage("stage1_stats"):
            grams, gsq = _statistics(ctx, o)
        originals = {h.name: h.weight_copy() for h in ctx.linears} if o.loss == "recon" else None
        with ctx.timer.stage("stage1_rpca"):
            pools = stage1_pools(ctx, o, grams)
        budget = _budget(pools, self.ratio)
        _check_budget(pools, budget)
        with ctx.timer.stage("stage2_scores"):
            cost = pools.costs()
            key = value_per_cost(pools, cost, o.score, grams, _normalize(o), gsq)
        with ctx.timer.stage("stage2_final"):
            keep0 = fill(pools, key, cost, budget, self.ratio, o.spread)  # the mask of the initial scores (0 policy steps)
        curve, keep = [], keep0
        if o.steps > 0:
            with ctx.timer.stage("stage2_policy"):
                s0, _ = initial_probabilities(pools, cost, budget, o.score, temperature=o.temperature, vpc=key)
                s, curve = self._train(ctx, pools, cost, budget, s0, key, grams, originals)
            with ctx.timer.stage("stage2_final"):
                keep = fill(pools, s, cost, budget, self.ratio, o.spread, tiebreak=key)
        achieved = pools.kept_cost(keep)
        with ctx.timer.stage("refit" if o.refit != "none" else "apply"):
            apply_mask(ctx, pools, keep, o.refit)
        ctx.extra.update({
            "budget": {"target": budget, "achieved": achieved, "slack": budget - achieved,
                       "max_direction_cost": max(p.direction_cost for p in pools.matrices)},
            "pools": pools.describe(),
            "allocation": _allocation(pools, keep, budget),
            "policy": {"curve": curve, "steps": o.steps,
                       "candidates_changed_vs_initial_scores": int((keep != keep0).sum()),
                       "kept_cost_changed_vs_initial_scores": pools.kept_cost(keep & ~keep0)},
        })

    def _train(self, ctx, pools, cost, budget, s0, key, grams, originals):
        o = self.options
        if o.loss == "lm":
            loss = _LMLoss(ctx, pools, ctx.calibration.windows[: o.policy_windows])
        elif o.loss == "recon":
            loss = _ReconLoss(pools, originals, grams)
        else:
            raise CapllmError(f"cap option loss={o.loss!r}: use lm or recon")
        pcfg = PolicyConfig(steps=o.steps, samples=o.samples, lr=o.lr, baseline=o.baseline, antithetic=o.antithetic, seed=o.seed)
        try:
            return self._run(pools, cost, budget, s0, key, loss, pcfg, ctx.progress)
        finally:
            if isinstance(loss, _LMLoss):
                loss.restore()

    def _run(self, pools, cost, budget, s0, key, loss, pcfg, progress):
        o = self.options
        if o.granularity == "candidate":
            res = run_policy(s0, cost, budget, loss, pcfg, progress)
            return res.s, res.curve
        if o.granularity != "group":
            raise CapllmError(f"cap option granularity={o.granularity!r}: use candidate or group")
        unit = _groups(pools, cost, key, o.groups_per_matrix)
        nunits = int(unit.max()) + 1
        ucost = torch.zeros(nunits, dtype=torch.float64).index_add_(0, unit, cost.double())
        us0 = torch.zeros(nunits, dtype=torch.float64).index_add_(0, unit, (s0 * cost).double()) / ucost
        res = run_policy(us0.float(), ucost.float(), budget, lambda um: loss(um[unit]), pcfg, progress)
        return res.s[unit], res.curve


@register
class CapUniform(Method):
    name = "cap-uniform"
    description = "CAP ablation: same RPCA pools and scores, same budget share in every matrix"
    Options = CapOptions

    def compress_model(self, ctx) -> None:
        o = self.options
        with ctx.timer.stage("stage1_stats"):
            grams, gsq = _statistics(ctx, o)
        with ctx.timer.stage("stage1_rpca"):
            pools = stage1_pools(ctx, o, grams)
        budget = _budget(pools, self.ratio)
        cost = pools.costs()
        with ctx.timer.stage("stage2_scores"):
            key = value_per_cost(pools, cost, o.score, grams, _normalize(o), gsq)
        keep = torch.zeros(pools.size, dtype=torch.bool)
        for p in pools.matrices:
            sl = slice(p.offset, p.offset + p.size)
            keep[sl] = greedy_fill(key[sl], cost[sl], int((1.0 - self.ratio) * p.shape[0] * p.shape[1]))
        with ctx.timer.stage("refit" if o.refit != "none" else "apply"):
            apply_mask(ctx, pools, keep, o.refit)
        ctx.extra.update({"budget": {"target": budget, "achieved": pools.kept_cost(keep)}, "pools": pools.describe(),
                          "allocation": _allocation(pools, keep, budget)})


@dataclass(frozen=True)
class ThresholdOptions(Stage1Options):
    rank_share: float = 0.3  # fraction of the budget spent on singular directions
    refit: str = "none"  # obs | none


@register
class RpcaThreshold(Method):
    name = "rpca-threshold"
    description = "CAP ablation without Stage 2: global hand thresholds on σ and |S| (fixed rank share)"
    Options = ThresholdOptions

    def compress_model(self, ctx) -> None:
        o = self.options
        if not 0.0 <= o.rank_share <= 1.0:
            raise CapllmError("rank_share must be in [0, 1]")
        grams = collect_grams(ctx, full=False) if o.act_aware else None
        with ctx.timer.stage("stage1_rpca"):
            pools = stage1_pools(ctx, o, grams)
        budget = _budget(pools, self.ratio)
        cost = pools.costs()
        is_dir = pools.is_direction()
        mag = torch.empty(pools.size)
        for p in pools.matrices:
            mag[p.offset : p.offset + p.rank] = p.sigma
            mag[p.offset + p.rank : p.offset + p.size] = p.entry_values().abs()
        keep = torch.zeros(pools.size, dtype=torch.bool)
        dir_budget = int(o.rank_share * budget)
        keep[is_dir] = greedy_fill(mag[is_dir], cost[is_dir], dir_budget)
        spent = int(cost[keep].double().sum())
        keep[~is_dir] = greedy_fill(mag[~is_dir], cost[~is_dir], budget - spent)
        apply_mask(ctx, pools, keep, o.refit)
        ctx.extra.update({"budget": {"target": budget, "achieved": pools.kept_cost(keep)}, "pools": pools.describe(),
                          "allocation": _allocation(pools, keep, budget)})


__all__ = ["Cap", "CapUniform", "RpcaThreshold", "CapOptions", "MatrixPool"]
