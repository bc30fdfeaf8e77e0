"""``cap``: global rank-and-sparsity allocation (Zhou et al., arXiv 2505.03801, ICLR 2026).

Stage 1 — robust PCA of every decoder linear, ``W = U diag(σ) Vᵀ + S``
(:mod:`capllm.decompose`; cached and resumable). Stage 2 — every singular direction (cost
``m + n``) and every non-zero of ``S`` (cost 1), across **all** matrices, is a candidate of one
pool (:mod:`capllm.allocate.pools`); a Bernoulli policy over them starts from activation-aware
scores (:mod:`capllm.allocate.scores`) and is trained by REINFORCE on the loss of the whole
masked model (:mod:`capllm.allocate.policy`; ``steps=0``, the measured default, keeps the
ranking of the initial scores) under the budget
``Σ c_k s_k = K = ⌊(1 − ρ) · Σ m n⌋``; the final mask ranks all candidates by ``s`` and keeps
greedily while the cost stays ``≤ K`` (:mod:`capllm.allocate.select`: one threshold found by
histograms over the per-matrix score files, never a sort of the whole model).

Every stage is a pass of the layer-wise engine or a sweep over per-matrix files, so only one
block's weights, statistics and candidates are in memory at a time; everything per model is in
the run's work directory (:class:`~capllm.allocate.store.CapStore`), and a killed run resumes
from the last finished block or matrix:

1. ``stage1`` — dense statistics and robust PCA, block by block (:mod:`capllm.allocate.stage1`);
2. ``fisher`` — output-gradient moments by a block-wise backward pass (:mod:`capllm.engine.backward`);
3. ``scores`` — the key of every candidate, matrix by matrix;
4. ``select`` — the final mask (streamed);
5. ``refit`` — apply and OBS-refit, block by block (:mod:`capllm.allocate.refit`).

The REINFORCE policy (``steps > 0``) is the exception: its keep-probabilities are one vector over
every candidate of the model, so it loads the pools into memory (small models only).

Our additions, each an option (off by default unless measured to win; BENCHMARKS.md, CAP quality),
besides the OBS refit (``refit=obs``, on):

* ``entry_score=obs`` — an entry is priced by its removal *with* its row compensating,
  ``½ S_ij² G_ii / [A⁻¹]_jj`` (:func:`capllm.solvers.obs.obs_entry_gain`), as the refit realises
  (measured on Gemma-3-270M at 50 %, global and unguarded, untuned: 389.98, against K-FAC's 209.15
  on older code);
* ``entry_score=diag`` — an entry is priced by the exact diagonal of the empirical Fisher,
  ``½ S_ij² E_t[g_ti² x_tj²]``, not K-FAC's ``½ S_ij² E[g_i²] E[x_j²]`` (measured on Gemma-3-270M
  at 50 %: held-out loss of the global allocation 5.050 against the uniform split's 5.168, where
  K-FAC's global allocation is worse than uniform, 5.301 — but refitted and tuned, that allocation
  reaches 117.36 against the uniform split's 112.52, so it is an option, not the default);
* ``calibrate=block`` — every block's keys rescaled by the loss its uniform split measurably costs
  over the loss its scores predict (:meth:`CapRun.calibrate`), so the global ranking compares
  like with like across blocks;
* ``scope=block`` — the ranking inside each block, every block at its own share;
* ``guard=…`` — the chosen allocation against ``uniform`` / ``block`` / ``mixα`` (each matrix's
  count ``(1 − α)`` × its uniform share + ``α`` × the global one's) on held-out windows.
  **On by default (``guard=auto``: ``uniform+mix0.25+mix0.5+mix0.75`` whenever the run has
  held-out windows, as every ``capllm compress`` run does)**, measured at 50 %: on Gemma-3-270M
  the global ranking loses to the uniform split (held-out loss 5.30 vs 5.17) and mix0.25 beats
  both (5.00): tuned, 96.99 against the uniform split's 101.67; on SmolLM2-135M mix0.75 (3.757)
  beats the global allocation (3.799) and the uniform one (3.895). Cost: 4 more calibration
  windows, five held-out evaluations;
* ``search=N`` — a (1 + 1) evolutionary search over per-block budget offsets around the applied
  allocation (:mod:`capllm.allocate.search`, EvoPress's level switch): ``N`` offspring, each moving
  ``search_step`` of a block's parameters from one block to another, scored by the masked model's
  loss on ``search_windows`` calibration windows; the result is applied only if it also lowers the
  guard's held-out loss. The issue's other route for Stage 2 (a few variables, not 10⁸);
* ``refit_iters`` — CG steps from the OBS values to the exact least-squares values on the support;
* ``refit=reselect`` — the OBS pass re-chooses the sparse entries at the allocation's counts per
  column block, by SparseGPT's input-only saliency (measured on Gemma-3-270M at 50 %, untuned:
  157.03 against 145.15 with the Fisher-chosen support kept, so off);
* ``tune_epochs`` — after each block's refit, Adam on the block's output over its kept values
  (:mod:`capllm.engine.block_tune`), towards the dense model's block output. **On by default
  (10 epochs, step 3e-3 of each tensor's RMS)**, measured at 50 %: SmolLM2-135M 49.79 → 43.59
  (5 epochs at a step ≈ 1.5e-3: 46.04), Gemma-3-270M 145.15 → 101.67 (5 epochs at 1.5e-3: 112.52), at about 3–4×
  the CPU time; skipped with a notice (and a record) when the run has fewer than
  ``tune_hold_out`` calibration windows, off with ``refit=none``; ``tune_backoff=β`` restarts an
  epoch that did not improve from the best values at β × the step.

**N:M** (``--structure 2:4``, ours): the sparse part keeps at most ``N`` of every ``M``
consecutive inputs of a row, the pattern GPUs run as semi-structured sparsity. The pool is
restricted to the ``N`` entries of each group that CAP's K-FAC key ranks first (within a row it
orders entries by ``S_ij² E[x_j²]``; :func:`~capllm.allocate.pools.nm_candidates`), so every
selection — global, guarded, uniform — and the support-preserving OBS refit and block tuning stay
``N:M``; the allocation then chooses how many of those entries each matrix gives up for singular
directions (a group may keep fewer than ``N``). With ``refit=reselect`` the OBS pass keeps each
group's count but chooses its survivors itself, as SparseGPT's N:M prune does — the default with a
structure (measured on SmolLM2-135M at 50 % 2:4, untuned: 116.60 against 119.76 with the
allocation's support kept and SparseGPT's 115.29; the allocation itself gains nothing there: the
guard's held-out losses of the global, uniform and mixed allocations agree to 0.2 %).

Also here, the paper's two ablations on the same pools:

* ``cap-uniform`` — each matrix gets the same share ``⌊(1 − ρ) m n⌋`` of the budget, filled
  greedily by the same scores (no global allocation);
* ``rpca-threshold`` — no Stage 2: global hand thresholds on ``σ`` and ``|S|`` with a fixed
  split of the budget between directions and entries (``rank_share``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from capllm.allocate.final_mask import greedy_fill
from capllm.allocate.policy import PolicyConfig, run_policy
from capllm.allocate.pools import CandidatePools, MatrixPool
from capllm.allocate.run import CapRun, mix_alpha, open_store
from capllm.allocate.scores import initial_probabilities
from capllm.allocate.search import SearchConfig, search_budgets
from capllm.allocate.stage1 import Stage1Options
from capllm.engine.block_tune import BlockTuneOptions
from capllm.errors import CapllmError
from capllm.methods.base import Method, register


@dataclass(frozen=True)
class CapOptions(Stage1Options, BlockTuneOptions):
    # initial scores
    score: str = "fisher"  # fisher | activation | magnitude | constant
    normalize: str = "auto"  # matrix | none | auto (none for fisher, whose scores are in loss units; else matrix)
    temperature: float = 0.5
    # our addition: a sparse entry's value — kfac (½ S² A_jj G_ii, removal alone: the paper's
    # first-order energy) or obs (½ S² G_ii / [A⁻¹]_jj, its row compensating, as the refit does)
    # or diag (½ S² E[g_i² x_j²], the exact diagonal of the empirical Fisher; one more matmul per linear in the backward)
    entry_score: str = "kfac"  # kfac | obs | diag
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
    # our addition: model = one ranking over every matrix (the paper); block = the ranking inside
    # each decoder block, every block keeping (1 − ρ) of its parameters (no cross-block comparison)
    scope: str = "model"  # model | block
    seed: int = 0
    # our addition: reconstruct the kept sparse values on the chosen support (none = the paper)
    # reselect = the OBS pass re-chooses the sparse entries at the allocation's counts per column
    # block (capllm.allocate.refit)
    refit: str = "obs"  # obs | reselect | none
    # our addition: conjugate-gradient steps from the OBS values to the exact least-squares optimum
    # on the chosen support (capllm.solvers.support_lstsq); 0 = the OBS pass alone
    refit_iters: int = 0
    # our addition: check the allocation against alternatives on held-out calibration windows
    # before applying it, keep the lowest loss (capllm.allocate.guard); none = always the selection
    # auto (the measured default: BENCHMARKS.md, CAP quality) = uniform+mix0.25+mix0.5+mix0.75 when the run has held-out
    # windows (every `capllm compress` run draws them), else skipped with a notice and a record
    # mixα = each matrix's count (1 − α) × its uniform share + α × the global selection's
    guard: str = "auto"  # auto | none | uniform | block | mixα, or several joined by + (block+uniform)
    guard_windows: int = 4
    # our addition: rescale each block's scores by the loss they predict vs the loss measured on
    # the held-out windows (CapRun.calibrate); none = the scores as they are
    calibrate: str = "none"  # none | block
    # our addition (issue 13, idea 2): a (1 + 1) search over per-block budget offsets around the
    # chosen allocation, scored by the loss of the masked model on search_windows calibration
    # windows, applied only if it lowers the guard's held-out loss (capllm.allocate.search);
    # search = the number of offspring scored (0 = off)
    search: int = 0
    search_step: float = 0.02  # parameters moved per mutation, as a fraction of a block's
    search_windows: int = 4
    search_check: str = "held_out"  # held_out | none (apply the search's result regardless: to measure the check)
    # our addition: block tuning after each block's refit (capllm.engine.block_tune); on by default
    # (measured: BENCHMARKS.md, CAP quality: SmolLM2-135M at 50 % 49.79 → 46.04 with 5 epochs at
    # a step ≈ 1.5e-3, → 43.59 with 10 at 3e-3); skipped with a notice when the run has fewer than
    # tune_hold_out calibration windows, and off with refit=none (no layer-wise pass to tune in)
    tune_epochs: int = 10


def _normalize(o) -> str:
    return ("none" if o.score == "fisher" else "matrix") if o.normalize == "auto" else o.normalize


GUARD_AUTO = "uniform+mix0.25+mix0.5+mix0.75"  # what guard=auto checks the global allocation against


def _guard_against(o) -> tuple[str, ...]:
    g = getattr(o, "guard", "none")
    g = GUARD_AUTO if g == "auto" else g
    return () if g == "none" else tuple(dict.fromkeys(a.strip() for a in g.split("+") if a.strip()))


def _structured_defaults(o, given: frozenset, structure):
    """With an N:M structure the refit re-chooses each group's survivors (``refit=reselect``) unless
    ``refit`` was given: measured on SmolLM2-135M at 50 % 2:4, untuned, 116.60 against 119.76 with the
    allocation's support kept (SparseGPT's own 2:4: 115.29; BENCHMARKS.md, CAP quality)."""
    if structure is None or "refit" in given or getattr(o, "refit", "none") != "obs":
        return o
    return replace(o, refit="reselect")


def _nm(ctx, o, structure) -> tuple[int, int] | None:
    """``(N, M)`` for :class:`CapRun`; refuses, before any work, a model whose inputs the per-group
    refit cannot tile (``refit=reselect`` needs every decoder linear's input width divisible by M)."""
    if structure is None:
        return None
    if o.refit == "reselect":
        bad = next((h for h in ctx.linears if h.shape[1] % structure.m), None)
        if bad is not None:
            raise CapllmError(f"{structure} with refit=reselect needs every input width divisible by {structure.m}, but {bad.name} has "
                              f"{bad.shape[1]}: pass --option refit=obs")
    return structure.n, structure.m


def _check_options(o, given: frozenset = frozenset()) -> None:
    if getattr(o, "score", "magnitude") not in ("fisher", "activation", "magnitude", "constant"):
        raise CapllmError(f"cap option score={o.score!r}: use fisher, activation, magnitude or constant")
    if getattr(o, "refit_iters", 0) < 0 or (getattr(o, "refit_iters", 0) > 0 and getattr(o, "refit", "none") == "none"):
        raise CapllmError(f"cap option refit_iters={o.refit_iters}: must be ≥ 0, and needs refit=obs or reselect")
    if getattr(o, "entry_score", "kfac") not in ("kfac", "obs", "diag"):
        raise CapllmError(f"cap option entry_score={o.entry_score!r}: use kfac, obs or diag")
    if getattr(o, "entry_score", "kfac") == "diag" and getattr(o, "score", "") != "fisher":
        raise CapllmError(f"cap option entry_score=diag is the diagonal of the Fisher: it needs score=fisher, not {o.score}")
    if getattr(o, "entry_score", "kfac") == "obs" and getattr(o, "score", "") not in ("fisher", "activation"):
        raise CapllmError(f"cap option entry_score=obs needs score=fisher or activation (it reprices the input statistic), not {o.score}")
    if "tune_epochs" in given and getattr(o, "tune_epochs", 0) > 0 and getattr(o, "refit", "none") == "none":
        raise CapllmError(f"cap option tune_epochs={o.tune_epochs} trains the values the refit writes: it needs refit=obs or reselect")
    if getattr(o, "refit", "none") not in ("obs", "reselect", "none"):
        raise CapllmError(f"cap option refit={o.refit!r}: use obs, reselect or none")
    if getattr(o, "loss", "lm") not in ("lm", "recon"):
        raise CapllmError(f"cap option loss={o.loss!r}: use lm or recon")
    if getattr(o, "spread", 0.0) < 0:
        raise CapllmError(f"cap option spread={o.spread}: must be ≥ 0 (inf = unconstrained)")
    if getattr(o, "guard", "none") != "none" and (not _guard_against(o) or not all(a in ("uniform", "block") or mix_alpha(a) is not None for a in _guard_against(o))):
        raise CapllmError(f"cap option guard={o.guard!r}: use auto, none, or alternatives joined by + among uniform, block and mixα "
                          f"(0 < α < 1, e.g. uniform+mix0.5)")
    if getattr(o, "scope", "model") not in ("model", "block"):
        raise CapllmError(f"cap option scope={o.scope!r}: use model or block")
    if getattr(o, "scope", "model") == "block" and getattr(o, "spread", float("inf")) != float("inf"):
        raise CapllmError("cap options scope=block and a finite spread do not combine: choose one")
    if getattr(o, "calibrate", "none") not in ("none", "block"):
        raise CapllmError(f"cap option calibrate={o.calibrate!r}: use none or block")
    if getattr(o, "search", 0) < 0 or not 0.0 < getattr(o, "search_step", 0.02) < 1.0 or getattr(o, "search_windows", 1) < 1:
        raise CapllmError(f"cap options search={o.search}, search_step={o.search_step}, search_windows={o.search_windows}: "
                          f"need search ≥ 0, 0 < search_step < 1, search_windows ≥ 1")
    if getattr(o, "search_check", "held_out") not in ("held_out", "none"):
        raise CapllmError(f"cap option search_check={o.search_check!r}: use held_out or none")
    if (getattr(o, "guard", "none") != "none" or getattr(o, "calibrate", "none") != "none" or getattr(o, "search", 0) > 0) and getattr(o, "guard_windows", 1) < 1:
        raise CapllmError(f"cap option guard_windows={o.guard_windows}: must be ≥ 1 with guard={o.guard}")


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

    distributed = True  # its stages divide over several processes (the policy excepted)
    supports_structure = True  # N:M: the pool keeps the N best entries of each group (CapRun.pool)

    @property
    def held_out_windows(self) -> int:
        """Calibration windows kept out of every statistic, for the allocation guard."""
        o = self.options
        return o.guard_windows if (o.guard != "none" or o.calibrate != "none" or o.search > 0) else 0

    def __init__(self, ratio: float, structure=None, options: dict | None = None) -> None:
        super().__init__(ratio, None, options)  # any ratio with N:M: the pool caps the sparse part, directions fill the rest
        self.structure = structure
        self.options = _structured_defaults(self.options, self.given_options, structure)
        _check_options(self.options, self.given_options)  # a wrong option fails before any work is done

    def compress_model(self, ctx) -> None:
        o = self.options
        if ctx.calibration is None:
            raise CapllmError("cap needs calibration data")
        if ctx.dist.enabled and o.steps > 0:
            raise CapllmError("cap's REINFORCE policy (steps > 0) runs in one process: run it without torchrun")
        with open_store(ctx) as store:
            run = CapRun(ctx, o, store, _nm(ctx, o, self.structure))
            run.stage1()
            run.fisher()
            run.scores(o.score, _normalize(o))
            budget = run.budget(self.ratio)
            run.check_budget(budget)
            calibration = run.calibrate(self.ratio, ctx.calibration.held_out) if o.calibrate == "block" else None
            sel = run.select(budget, self.ratio, o.spread, o.scope)  # the mask of the initial scores (0 policy steps)
            policy = {"curve": [], "steps": o.steps, "candidates_changed_vs_initial_scores": 0, "kept_cost_changed_vs_initial_scores": 0}
            if o.steps > 0:
                sel, policy = self._policy(ctx, run, budget, sel)
            guard = None
            held = ctx.calibration.held_out
            if o.guard == "auto" and (held is None or len(held) == 0):
                guard = {"chosen": "global", "skipped": "no held-out calibration windows (guard=auto): the global allocation is applied unchecked"}
                print(f"capllm: cap: {guard['skipped']}", file=sys.stderr)
            elif o.guard != "none":
                sel, guard = run.guard(sel, self.ratio, ctx.calibration.held_out, _guard_against(o))
            search = None
            if o.search > 0:
                held_start = guard["losses"][guard["chosen"]] if guard and "losses" in guard else None
                cfg = SearchConfig(o.search, o.search_step, o.seed, check=o.search_check == "held_out")
                sel, search = search_budgets(run, sel, cfg, ctx.calibration.windows[: o.search_windows], held, held_start)
            run.apply(o.refit, o.refit_iters, self.block_tune)
            ctx.extra.update({"budget": sel["budget"], "pools": sel["pools"], "allocation": sel["allocation"], "policy": policy,
                              **({"selection": sel["selection"]} if sel.get("selection") else {}), **({"guard": guard} if guard else {}),
                              **({"search": search} if search else {}),
                              **({"calibration": calibration} if calibration else {})})

    def _policy(self, ctx, run: CapRun, budget: int, sel: dict):
        """REINFORCE over every candidate (whole-model vectors in memory: small models only)."""
        o = self.options
        pools = run.pools_in_memory()
        cost = pools.costs()
        key = run.keys_in_memory()
        keep0 = torch.cat([run.store.keep(h.name) for h in ctx.linears])
        with ctx.timer.stage("stage2_policy"):
            s0, _ = initial_probabilities(pools, cost, budget, o.score, temperature=o.temperature, vpc=key)
            grams = None
            if o.loss == "recon":
                grams = {}
                for h in ctx.linears:
                    grams[h.name] = run.store.block_stats(h.block_index)[h.name]["gram"]
            originals = {h.name: h.weight_copy() for h in ctx.linears} if o.loss == "recon" else None
            s, curve = self._train(ctx, pools, cost, budget, s0, key, grams, originals)
        with ctx.timer.stage("stage2_final"):
            keep = fill(pools, s, cost, budget, self.ratio, o.spread, tiebreak=key)
        for p in pools.matrices:
            run.store.save_keep(p.name, keep[p.offset : p.offset + p.size])
        rows = {p.name: (int(keep[p.offset : p.offset + p.rank].sum()), int(keep[p.offset + p.rank : p.offset + p.size].sum())) for p in pools.matrices}
        sel = run._finish_select({}, rows, budget)
        policy = {"curve": curve, "steps": o.steps, "candidates_changed_vs_initial_scores": int((keep != keep0).sum()),
                  "kept_cost_changed_vs_initial_scores": pools.kept_cost(keep & ~keep0)}
        return sel, policy

    def _train(self, ctx, pools, cost, budget, s0, key, grams, originals):
        o = self.options
        if o.loss == "lm":
            loss = _LMLoss(ctx, pools, ctx.calibration.windows[: o.policy_windows])
        else:
            loss = _ReconLoss(pools, originals, grams)
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


def fill(pools: CandidatePools, s: torch.Tensor, cost: torch.Tensor, budget: int, ratio: float, spread: float,
         tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """The policy's final mask in memory: global greedy fill, or bounded per matrix."""
    from capllm.allocate.final_mask import bounded_fill

    if spread == float("inf"):
        return greedy_fill(s, cost, budget, tiebreak=tiebreak)
    sizes = torch.tensor([p.size for p in pools.matrices])
    segment = torch.repeat_interleave(torch.arange(len(pools.matrices)), sizes)
    dense = torch.tensor([p.shape[0] * p.shape[1] for p in pools.matrices], dtype=torch.float64)
    keep_frac = 1.0 - ratio
    floor = (dense * keep_frac * max(0.0, 1.0 - spread)).floor()
    cap = (dense * min(1.0, keep_frac * (1.0 + spread))).floor()
    return bounded_fill(s, cost, budget, segment, floor, cap, tiebreak=tiebreak)


@register
class CapUniform(Method):
    name = "cap-uniform"
    description = "CAP ablation: same RPCA pools and scores, same budget share in every matrix"
    Options = CapOptions
    distributed = True
    supports_structure = True

    def __init__(self, ratio: float, structure=None, options: dict | None = None) -> None:
        super().__init__(ratio, None, options)  # any ratio with N:M: the pool caps the sparse part, directions fill the rest
        self.structure = structure
        self.options = _structured_defaults(self.options, self.given_options, structure)
        _check_options(self.options, self.given_options)  # a wrong option fails before any work is done

    def compress_model(self, ctx) -> None:
        o = self.options
        with open_store(ctx) as store:
            run = CapRun(ctx, o, store, _nm(ctx, o, self.structure))
            run.stage1()
            run.fisher()
            run.scores(o.score, _normalize(o))
            with ctx.timer.stage("stage2_final"):
                sel = run.select_per_matrix(self.ratio)
            run.apply(o.refit, o.refit_iters, self.block_tune)
            ctx.extra.update({"budget": {"target": sel["budget"]["target"], "achieved": sel["budget"]["achieved"]}, "pools": sel["pools"],
                              "allocation": sel["allocation"]})


@dataclass(frozen=True)
class ThresholdOptions(Stage1Options):
    rank_share: float = 0.3  # fraction of the budget spent on singular directions
    refit: str = "none"  # obs | none


@register
class RpcaThreshold(Method):
    name = "rpca-threshold"
    description = "CAP ablation without Stage 2: global hand thresholds on σ and |S| (fixed rank share)"
    Options = ThresholdOptions
    distributed = True

    def compress_model(self, ctx) -> None:
        o = self.options
        if not 0.0 <= o.rank_share <= 1.0:
            raise CapllmError("rank_share must be in [0, 1]")
        _check_options(o)
        with open_store(ctx) as store:
            run = CapRun(ctx, o, store)
            run.stage1()
            run.magnitudes()
            budget = run.budget(self.ratio)
            sel = run.select_split(budget, int(o.rank_share * budget))
            run.apply(o.refit)
            ctx.extra.update({"budget": {"target": budget, "achieved": sel["budget"]["achieved"]}, "pools": sel["pools"], "allocation": sel["allocation"]})


__all__ = ["Cap", "CapUniform", "RpcaThreshold", "CapOptions", "CapRun", "MatrixPool"]
