"""One CAP-family run over the per-model files of a :class:`~capllm.allocate.store.CapStore`.

:class:`CapRun` strings CAP's stages together — each an engine pass or a sweep over per-matrix
files, each resumable (see :mod:`capllm.methods.cap` for the method and its options):

* :meth:`CapRun.stage1` — statistics and robust PCA, block by block (:mod:`capllm.allocate.stage1`);
* :meth:`CapRun.fisher` — output-gradient moments by the block-wise backward pass;
* :meth:`CapRun.scores` — the key (importance per parameter) of every candidate, one file per matrix;
* :meth:`CapRun.select` / :meth:`CapRun.select_per_matrix` / :meth:`CapRun.select_split` — the final
  mask of ``cap`` / ``cap-uniform`` / ``rpca-threshold`` (:mod:`capllm.allocate.select`);
* :meth:`CapRun.apply` — write the chosen factors and entries, with the OBS refit block by block.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import torch

from capllm.allocate.final_mask import greedy_fill
from capllm.allocate.pools import CandidatePools, MatrixPool, nm_candidates
from capllm.allocate.refit import Decision, refit_layerwise
from capllm.allocate.scores import matrix_costs, matrix_importance
from capllm.allocate.select import Segment, streamed_bounded, streamed_greedy
from capllm.allocate.stage1 import load_pool, run_stage1, run_stage1_without_data, stage1_dir
from capllm.allocate.store import CapStore
from capllm.errors import CapllmError
from capllm.engine.compressed import CompressedWeight
from capllm.utils import cache_dir


@contextlib.contextmanager
def open_store(ctx):
    """The run's :class:`CapStore`: in its work directory, or a temporary one (library calls)."""
    if ctx.work_dir is not None:
        yield CapStore(ctx.work_dir / "cap", ctx.dist)
        return
    if ctx.dist.enabled:
        raise CapllmError("cap on several processes needs a work directory all ranks share (capllm compress gives one)")
    root = cache_dir() / "work"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="cap-", dir=root))
    saved = ctx.work_dir
    ctx.work_dir = tmp
    try:
        yield CapStore(tmp / "cap")
    finally:
        ctx.work_dir = saved
        shutil.rmtree(tmp, ignore_errors=True)


class CapRun:
    """One CAP-family run over the per-model files of a :class:`CapStore` (module docstring)."""

    def __init__(self, ctx, o, store: CapStore, structure: tuple[int, int] | None = None) -> None:
        self.ctx, self.o, self.store = ctx, o, store
        self.handles = {h.name: h for h in ctx.linears}
        self.s1: Path | None = None
        self._block_scale: dict[int, float] | None = None  # set by calibrate()
        self.structure = structure  # (N, M): the sparse part keeps at most N of every M consecutive inputs
        self._energy: tuple[int, dict] | None = None  # (block, its matrices' E[x_j²]) for the N:M pool

    def _on_main(self, work, stage: str):
        """Run ``work()`` on rank 0 only (it writes per-model files); every rank then reads the
        finished stage's record. One process: just ``work()``."""
        dist = self.ctx.dist
        if not dist.enabled:
            return work()
        out = work() if dist.is_main else None
        dist.barrier()
        return out if dist.is_main else self.store.stage(stage)

    # --- stage 1 and statistics -----------------------------------------------------------------
    def needs_stats(self) -> bool:
        o = self.o
        return getattr(o, "score", "magnitude") in ("activation", "fisher") or o.act_aware or self.keep_gram()

    def full_gram(self) -> bool:
        return getattr(self.o, "score", "") in ("activation", "fisher") or self.keep_gram()

    def keep_gram(self) -> bool:
        return getattr(self.o, "loss", "") == "recon" and getattr(self.o, "steps", 0) > 0

    def stage1(self) -> None:
        ctx = self.ctx
        if not self.needs_stats():
            self.s1 = stage1_dir(ctx, self.o)
            if ctx.dist.is_main:
                run_stage1_without_data(ctx, self.o)
            ctx.dist.barrier()
            return
        if ctx.calibration is None:
            raise CapllmError("cap needs calibration data")
        fisher = getattr(self.o, "score", "") == "fisher"
        with ctx.timer.stage("stage1"):
            self.s1 = run_stage1(ctx, self.o, self.store, self.full_gram(), keep_inputs=fisher and self.store.stage("fisher") is None, keep_gram=self.keep_gram(),
                                 entry_gain=self.full_gram() and getattr(self.o, "entry_score", "kfac") == "obs")

    def fisher(self) -> None:
        """``G = E[g²]`` of every linear's output gradient, by the block-wise backward pass."""
        from capllm.engine.backward import DiskCheckpoint, blockwise_output_grad_sq
        from capllm.engine.capture import capture_block_inputs
        from capllm.engine.layerwise import place_outside_blocks
        from capllm.models.layers import find_decoder_blocks

        if getattr(self.o, "score", "") != "fisher" or self.store.stage("fisher") is not None:
            return
        ctx, store, dist = self.ctx, self.store, self.ctx.dist
        with ctx.timer.stage("fisher"):
            _, blocks = find_decoder_blocks(ctx.model)
            place_outside_blocks(ctx.model, ctx.device)
            windows = ctx.calibration.windows[dist.shard(len(ctx.calibration.windows))]  # this rank's share (all: one process)
            captured = capture_block_inputs(ctx.model, blocks, windows, ctx.device)
            ckpt_path = store.root / ("fisher-checkpoint.pt" if not dist.enabled else f"fisher-checkpoint.rank{dist.rank}of{dist.world}.pt")
            ckpt = DiskCheckpoint(ckpt_path)
            n_tokens = len(ctx.calibration.windows) * (windows.shape[1] - 1)  # over every rank

            def entries(i: int, F: dict[str, torch.Tensor]) -> None:  # entry_score=diag: one block at a time, to disk
                for t in F.values():
                    dist.all_reduce_(t)
                if dist.is_main:
                    store.save_entry_fisher(i, {k: v / n_tokens for k, v in F.items()})

            want_entries = getattr(self.o, "entry_score", "kfac") == "diag"
            G = blockwise_output_grad_sq(ctx.model, lambda i: captured.for_block(i, store.inputs(i)), store.inputs(None), windows, ctx.device,
                                         ctx.linears, start=ckpt.load(), on_block_done=ckpt, progress=ctx.progress, compute_dtype=ctx.compute_dtype,
                                         on_entry_stats=entries if want_entries else None)
            ctx.model.to("cpu")
            if dist.enabled:  # E[g²] over every rank's tokens
                from capllm.engine.distributed import reduce_means

                reduce_means(dist, len(windows) * (windows.shape[1] - 1), list(G.values()))
            if dist.is_main:
                store.save_grad(G)
                store.finish_stage("fisher")
            dist.barrier()
            if dist.is_main:
                store.drop_inputs()
            ckpt_path.unlink(missing_ok=True)

    # --- scores -----------------------------------------------------------------------------------
    def pool(self, name: str) -> MatrixPool:
        """Matrix ``name``'s candidates: Stage 1's directions and entries; with an ``N:M`` structure only
        the entries :func:`~capllm.allocate.pools.nm_candidates` allows (the same on every load, so
        keys, selections and the refit all see one pool)."""
        p = load_pool(self.s1, name, self.handles[name].shape)
        if self.structure is None:
            return p
        return p.restricted(nm_candidates(p.S, self._input_energy(name), *self.structure))

    def _input_energy(self, name: str) -> torch.Tensor | None:
        """``E[x_j²]`` of matrix ``name``'s inputs from the run's statistics (``None`` without them)."""
        i = self.handles[name].block_index
        if self._energy is None or self._energy[0] != i:
            stats = self.store.block_stats(i) if self.store.has_block_stats(i) else {}
            self._energy = (i, {k: v["adiag"] for k, v in stats.items() if "adiag" in v})
        return self._energy[1].get(name)

    def scores(self, kind: str, normalize: str) -> None:
        """The ranking key (importance per parameter) of every candidate, one file per matrix."""
        if self.store.stage("scores") is None:
            self._on_main(lambda: self._scores(kind, normalize), "scores")

    def _scores(self, kind: str, normalize: str) -> None:
        ctx, store = self.ctx, self.store
        G = store.grad() if kind == "fisher" else None
        block_stats, block_index, block_efisher = None, None, None
        diag = kind == "fisher" and getattr(self.o, "entry_score", "kfac") == "diag"
        from tqdm.auto import tqdm

        with ctx.timer.stage("stage2_scores"):
            for h in tqdm(ctx.linears, desc="CAP stage 2: scores", unit="matrix", disable=not ctx.progress):
                if store.score_path(h.name).exists():
                    continue
                p = self.pool(h.name)
                vcv = adiag = None
                if kind in ("activation", "fisher"):
                    if block_index != h.block_index:
                        block_stats, block_index = store.block_stats(h.block_index), h.block_index
                        block_efisher = store.entry_fisher(h.block_index) if diag else None
                    vcv, adiag = block_stats[h.name]["vcv"], block_stats[h.name]["adiag"]
                gain = efisher = None
                if diag:
                    if block_efisher is None or h.name not in block_efisher:
                        raise CapllmError(f"the run's Fisher statistics of {h.name} have no per-entry part (entry_score=diag): start the run in a new --out")
                    efisher = block_efisher[h.name]
                if kind in ("activation", "fisher") and getattr(self.o, "entry_score", "kfac") == "obs":
                    if "gain" not in block_stats[h.name]:
                        raise CapllmError(f"the run's statistics of {h.name} have no OBS gain (entry_score=obs): start the run in a new --out")
                    gain = block_stats[h.name]["gain"]
                imp = matrix_importance(p, kind, vcv, adiag, None if G is None else G[h.name], normalize, entry_gain=gain, entry_fisher=efisher)
                store.save_key(h.name, imp / matrix_costs(p), p.rank, p.nnz, p.direction_cost)
            store.finish_stage("scores")
            store.drop_entry_fisher()  # read by the scores only: its disk (2 bytes per weight) back

    def magnitudes(self) -> None:
        """``rpca-threshold``'s key: σ for directions, |S| for entries."""
        if self.store.stage("scores") is None:
            self._on_main(self._magnitudes, "scores")

    def _magnitudes(self) -> None:
        store = self.store
        for h in self.ctx.linears:
            p = self.pool(h.name)
            store.save_key(h.name, torch.cat([p.sigma, p.entry_values().abs()]).float(), p.rank, p.nnz, p.direction_cost)
        store.finish_stage("scores")

    # --- the pools as seen by the selection -------------------------------------------------------
    def segments(self) -> list[Segment]:
        segs = []
        for h in self.ctx.linears:
            m = self.store.key_meta(h.name)
            segs.append(Segment(m["rank"] + m["nnz"], m["rank"], m["direction_cost"]))
        return segs

    def dense_params(self) -> int:
        return sum(h.numel for h in self.ctx.linears)

    def budget(self, ratio: float) -> int:
        return int((1.0 - ratio) * self.dense_params())

    def check_budget(self, budget: int) -> None:
        pool_cost = sum(s.rank * s.direction_cost + s.size - s.rank for s in self.segments())
        if pool_cost <= budget:
            raise CapllmError(f"the Stage 1 pools cost {pool_cost:,} ≤ budget {budget:,}: nothing to choose; use a higher --ratio or a larger --option lam_scale")

    def load_key(self, k: int) -> torch.Tensor:
        key = self.store.key(self.ctx.linears[k].name)
        return key if self._block_scale is None else key * self._block_scale[self.ctx.linears[k].block_index]

    # --- per-block calibration of the scores --------------------------------------------------------
    def calibrate(self, ratio: float, windows: torch.Tensor | None) -> dict:
        """Rescale every block's keys so that its scores predict the loss they stand for.

        The scores are second-order estimates of the loss increase of removing each candidate,
        summed as if independent; a global ranking compares them across blocks, which is only
        fair if the estimate is equally good everywhere. For each block ``b``: the uniform split
        (every matrix ``⌊(1 − ρ) m n⌋``, its own ranking) removes a set ``R_b`` whose predicted
        cost is ``P_b = Σ_{k ∈ R_b} key_k c_k``; the measured cost is ``M_b = ℓ(block b at W̃) − ℓ(dense)``
        on the held-out windows (every other block dense; :func:`capllm.allocate.guard.masked_loss`).
        Every key of block ``b`` is multiplied by ``M_b / P_b`` (``M_b`` floored at 1 % of the mean
        ``M``): the factors are the diagnosis (≫ 1: a block whose scores under-state its damage).
        Within a block the ranking is unchanged. Resumable (the factors are recorded, keys are not rewritten).
        Both sides are without a refit, as the K-FAC entry score is; with ``entry_score=obs`` the
        prediction assumes a compensation that this measurement does not make."""
        if windows is None or len(windows) == 0:
            raise CapllmError("cap option calibrate=block needs held-out calibration windows (guard_windows ≥ 1)")
        info = self.store.stage("calibrate") or self._on_main(lambda: self._calibrate(ratio, windows), "calibrate")
        self._block_scale = {int(b): float(f) for b, f in info["factors"].items()}
        return info

    def _calibrate(self, ratio: float, windows: torch.Tensor) -> dict:
        from tqdm.auto import tqdm

        from capllm.allocate.guard import masked_loss

        ctx = self.ctx
        with ctx.timer.stage("calibrate"):
            self._alternative("uniform", ratio)  # keys are not scaled yet: the plain uniform split
            predicted: dict[int, float] = {}
            for k, h in enumerate(ctx.linears):
                key, cost, keep = self.store.key(h.name), _costs(self._segs[k]), self.store.keep(h.name, kind="keep-uniform")
                predicted[h.block_index] = predicted.get(h.block_index, 0.0) + float((key.double() * cost.double())[~keep].sum())
            dense = masked_loss(ctx, self.decision, windows, blocks=set())
            measured = {}
            for b in tqdm(sorted(predicted), desc="CAP calibration: blocks", unit="block", disable=not ctx.progress):
                measured[b] = masked_loss(ctx, lambda n: self.decision(n, kind="keep-uniform"), windows, blocks={b}) - dense
        floor = 0.01 * max(1e-12, sum(max(v, 0.0) for v in measured.values()) / len(measured))
        factors = {b: max(measured[b], floor) / max(predicted[b], 1e-30) for b in predicted}
        info = {"windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "dense_loss": dense,
                "measured": {str(b): v for b, v in measured.items()}, "predicted": {str(b): v for b, v in predicted.items()},
                "factors": {str(b): v for b, v in factors.items()},
                "measured_on": "held-out calibration windows; one block at a time at the uniform split, Stage 1 values before the refit"}
        self.store.finish_stage("calibrate", info)
        return info

    def keep_writer(self, kind: str = "keep"):
        rows = {}

        def store_keep(k: int, keep: torch.Tensor) -> None:
            h = self.ctx.linears[k]
            seg = self._segs[k]
            r, e = int(keep[: seg.rank].sum()), int(keep[seg.rank :].sum())
            rows[h.name] = (r, e)
            self.store.save_keep(h.name, keep, kind=kind)

        return rows, store_keep

    def select(self, budget: int, ratio: float, spread: float, scope: str = "model") -> dict:
        """The final mask of the global ranking (bounded per matrix when ``spread`` is finite;
        inside each decoder block when ``scope="block"``)."""
        return self.store.stage("select") or self._on_main(lambda: self._select(budget, ratio, spread, scope), "select")

    def _select_blocks(self, ratio: float, store_keep) -> dict:
        """The global ranking inside each decoder block: block ``b`` keeps ``⌊(1 − ρ) Σ_{W ∈ b} m n⌋``,
        shared among its matrices by the scores — no comparison of scores across blocks."""
        segs = self._segs
        by_block: dict[int, list[int]] = {}
        for k, h in enumerate(self.ctx.linears):
            by_block.setdefault(h.block_index, []).append(k)
        spent = 0
        for ks in by_block.values():
            b = int((1.0 - ratio) * sum(self.ctx.linears[k].numel for k in ks))
            info = streamed_greedy([segs[k] for k in ks], lambda i, ks=ks: self.load_key(ks[i]), b, lambda i, keep, ks=ks: store_keep(ks[i], keep))
            spent += info["spent"]
        return {"scope": "block", "blocks": len(by_block), "spent": spent}

    def _select(self, budget: int, ratio: float, spread: float, scope: str = "model") -> dict:
        store = self.store
        if (done := store.stage("select")) is not None:
            return done
        self._segs = segs = self.segments()
        rows, store_keep = self.keep_writer()
        with self.ctx.timer.stage("stage2_final"):
            if scope == "block":
                info = self._select_blocks(ratio, store_keep)
            elif spread == float("inf"):
                info = streamed_greedy(segs, self.load_key, budget, store_keep, progress=self.ctx.progress, desc="CAP stage 2: selection")
            else:
                keep_frac = 1.0 - ratio
                floor = [int(h.numel * keep_frac * max(0.0, 1.0 - spread)) for h in self.ctx.linears]
                cap = [int(h.numel * min(1.0, keep_frac * (1.0 + spread))) for h in self.ctx.linears]
                info = streamed_bounded(segs, self.load_key, budget, floor, cap, store_keep, progress=self.ctx.progress)
        return self._finish_select(info, rows, budget)

    def select_per_matrix(self, ratio: float) -> dict:
        """``cap-uniform``: each matrix filled greedily to its own share ``⌊(1 − ρ) m n⌋``."""
        return self.store.stage("select") or self._on_main(lambda: self._select_per_matrix(ratio), "select")

    def _select_per_matrix(self, ratio: float) -> dict:
        store = self.store
        if (done := store.stage("select")) is not None:
            return done
        self._segs = self.segments()
        rows, store_keep = self.keep_writer()
        self._fill_uniform(ratio, store_keep)
        return self._finish_select({}, rows, self.budget(ratio))

    def _fill_uniform(self, ratio: float, store_keep, alpha: float = 0.0) -> None:
        """Every matrix filled greedily by its own keys to its own share ``u_k = ⌊(1 − ρ) m n⌋``;
        with ``alpha`` (the guard's ``mixα``) to ``(1 − α) u_k + α g_k`` instead, between that
        share and what the global selection gave the matrix, ``g_k`` — the budget is the same
        convex combination of the two equal budgets."""
        for k, h in enumerate(self.ctx.linears):
            c, share = _costs(self._segs[k]), int((1.0 - ratio) * h.numel)
            if alpha:
                share = int((1.0 - alpha) * share + alpha * int(c[self.store.keep(h.name)].sum()))
            store_keep(k, greedy_fill(self.load_key(k), c, share))

    def select_split(self, budget: int, dir_budget: int) -> dict:
        """``rpca-threshold``: directions by σ within ``dir_budget``, then entries by |S|."""
        return self.store.stage("select") or self._on_main(lambda: self._select_split(budget, dir_budget), "select")

    def _select_split(self, budget: int, dir_budget: int) -> dict:
        store = self.store
        if (done := store.stage("select")) is not None:
            return done
        self._segs = segs = self.segments()
        first: dict[int, torch.Tensor] = {}
        is_dir = lambda k: torch.arange(segs[k].size) < segs[k].rank  # noqa: E731
        info = streamed_greedy(segs, self.load_key, dir_budget, lambda k, keep: first.__setitem__(k, keep[: segs[k].rank].clone()), allowed=is_dir)
        spent = info["spent"]
        rows, store_keep = self.keep_writer()

        def merge(k, keep):
            keep = keep.clone()
            keep[: segs[k].rank] |= first[k]
            store_keep(k, keep)

        streamed_greedy(segs, self.load_key, budget - spent, merge, allowed=lambda k: ~is_dir(k))
        return self._finish_select({}, rows, budget)

    def _finish_select(self, info: dict, rows: dict, budget: int) -> dict:
        alloc, achieved = [], 0
        for h, seg in zip(self.ctx.linears, self._segs):
            r, e = rows[h.name]
            kept = r * seg.direction_cost + e
            achieved += kept
            m, n = h.shape
            alloc.append({"name": h.name, "shape": [m, n], "rank_pool": seg.rank, "nnz_pool": seg.size - seg.rank, "rank_kept": r, "nnz_kept": e,
                          "kept_params": kept, "kept_fraction": round(kept / (m * n), 6), "budget_share": round(kept / budget, 6)})
        segs = self._segs
        out = {"budget": {"target": budget, "achieved": achieved, "slack": budget - achieved, "max_direction_cost": max(s.direction_cost for s in segs)},
               "pools": {"matrices": len(segs), "directions": sum(s.rank for s in segs), "sparse_entries": sum(s.size - s.rank for s in segs),
                         "pool_cost": (pc := sum(s.rank * s.direction_cost + s.size - s.rank for s in segs)),
                         "pool_cost_over_dense": round(pc / self.dense_params(), 4)},
               "allocation": alloc, "selection": info}
        self.store.finish_stage("select", out)
        return out

    # --- the allocation guard -------------------------------------------------------------------
    def guard(self, sel: dict, ratio: float, windows: torch.Tensor | None, against: tuple[str, ...] = ("uniform",)) -> tuple[dict, dict]:
        """Check the selected (global) mask against each allocation of ``against`` — ``uniform``
        (every matrix its own share, ``cap-uniform``), ``block`` (the ranking inside each block,
        every block its own share) and ``mixα`` (every matrix ``(1 − α)`` × its uniform count +
        ``α`` × the global one's) — on held-out windows (:mod:`capllm.allocate.guard`);
        the one of lowest loss becomes the mask. Returns ``(selection, guard record)``; resumable
        (the choice is recorded before it is applied)."""
        if windows is None or len(windows) == 0:
            raise CapllmError("cap option guard needs held-out calibration windows (guard_windows ≥ 1)")
        store = self.store
        info = store.stage("guard") or self._on_main(lambda: self._guard_losses(ratio, windows, against), "guard")
        if info["chosen"] != "global":
            sel = store.stage("guard-applied") or self._on_main(lambda: self._apply_alternative(info["chosen"], sel["budget"]["target"]), "guard-applied")
        return sel, info

    def _alternative(self, alt: str, ratio: float) -> None:
        """Write the masks of allocation ``alt`` as the candidate mask set ``keep-<alt>``."""
        self._segs = self.segments()
        _, store_keep = self.keep_writer(kind=f"keep-{alt}")
        if alt == "block":
            self._select_blocks(ratio, store_keep)
        else:
            self._fill_uniform(ratio, store_keep, mix_alpha(alt) or 0.0)

    def _guard_losses(self, ratio: float, windows: torch.Tensor, against: tuple[str, ...]) -> dict:
        from capllm.allocate.guard import masked_loss

        ctx, store = self.ctx, self.store
        losses = {}
        with ctx.timer.stage("guard"):
            losses["global"] = masked_loss(ctx, self.decision, windows)
            for alt in against:
                self._alternative(alt, ratio)
                losses[alt] = masked_loss(ctx, lambda n, alt=alt: self.decision(n, kind=f"keep-{alt}"), windows)
        chosen = min(losses, key=lambda k: (losses[k], k != "global"))  # a tie keeps the global allocation
        info = {"against": list(against), "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "losses": losses,
                **{f"loss_{k}": v for k, v in losses.items()}, "chosen": chosen,
                "measured_on": "held-out calibration windows, Stage 1 values before the refit"}
        store.finish_stage("guard", info)
        return info

    def _apply_alternative(self, alt: str, budget: int, stage: str = "guard-applied") -> dict:
        """Make the candidate mask set ``keep-<alt>`` the mask (recorded as stage ``stage``)."""
        self._segs = self.segments()
        rows, store_keep = self.keep_writer()
        for k, h in enumerate(self.ctx.linears):
            store_keep(k, self.store.keep(h.name, kind=f"keep-{alt}"))
        out = self._finish_select({"guard" if stage == "guard-applied" else alt: f"{alt} allocation chosen"}, rows, budget)
        self.store.finish_stage(stage, out)
        return out

    # --- apply --------------------------------------------------------------------------------
    def decision(self, name: str, kind: str = "keep") -> Decision:
        p = self.pool(name)
        U, V, S = p.compose(self.store.keep(name, kind))
        mask = torch.zeros(p.shape, dtype=torch.bool) if S is None else S != 0
        return Decision(U, V, S, mask)

    def apply(self, refit: str, iters: int = 0, tune=None) -> None:
        ctx = self.ctx
        with ctx.timer.stage("refit" if refit != "none" else "apply"):
            if refit in ("obs", "reselect"):
                refit_layerwise(ctx, self.decision, iters=iters, tune=tune, reselect=refit == "reselect", structure=self.structure)
                return
            if tune is not None and tune.active:  # the default tuning; an explicit one is refused with refit=none
                ctx.extra["block_tune"] = {"skipped": "refit=none: no layer-wise pass to tune in"}
            for h in ctx.linears:
                d = self.decision(h.name)
                S = d.S if d.S is not None or d.U is not None else torch.zeros(d.mask.shape)
                ctx.apply(h, CompressedWeight(S=S, mask=d.mask if S is not None else None, U=d.U, V=d.V))

    # --- in memory, for the policy --------------------------------------------------------------
    def pools_in_memory(self) -> CandidatePools:
        return CandidatePools([self.pool(h.name) for h in self.ctx.linears])

    def keys_in_memory(self) -> torch.Tensor:
        return torch.cat([self.load_key(k) for k in range(len(self.ctx.linears))])


def mix_alpha(alt: str) -> float | None:
    """α of a guard alternative ``mixα`` (0 < α < 1; :meth:`CapRun._fill_uniform`), else ``None``."""
    try:
        a = float(alt[3:]) if alt.startswith("mix") else None
    except ValueError:
        return None
    return a if a is not None and 0.0 < a < 1.0 else None


def _costs(seg: Segment) -> torch.Tensor:
    c = torch.ones(seg.size, dtype=torch.float32)
    c[: seg.rank] = seg.direction_cost
    return c


