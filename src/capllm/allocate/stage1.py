"""CAP Stage 1 as a pass of the layer-wise engine: statistics and robust PCA, block by block.

For each decoder block, on the inputs the *dense* model gives it (a statistics-only pass of
:func:`capllm.engine.layerwise.run_layerwise`):

1. accumulate every linear's input second moment ``A = E[x xᵀ]`` (or only ``E[x_j²]``);
2. robust PCA of each of its matrices (:mod:`capllm.decompose`), activation-aware on
   ``W·diag(√A_jj)`` (``act_aware``), into the resumable per-matrix cache — by default under
   ``$CAPLLM_CACHE/stage1/<model and options fingerprint>``, or a ``capllm decompose`` output given
   as ``stage1_dir``;
3. keep of ``A`` only what the scores need — ``diag A`` and ``v_kᵀ A v_k`` for each Stage 1
   direction (:func:`capllm.allocate.scores.reduce_gram`), and ``1 / [A⁻¹]_jj`` for the ``obs``
   entry score (:func:`capllm.solvers.obs.obs_entry_gain`) — in the run's
   :class:`~capllm.allocate.store.CapStore`, and drop ``A``;
4. for the ``fisher`` score, write the block's inputs to the store for the block-wise backward
   pass (:mod:`capllm.engine.backward`).

So only one block's Grams exist at any time. :func:`load_pool` reads one matrix's Stage 1
result back as a :class:`~capllm.allocate.pools.MatrixPool`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from capllm.allocate.pools import MatrixPool
from capllm.allocate.scores import reduce_gram
from capllm.allocate.store import CapStore
from capllm.engine.stats import InputStats
from capllm.models.layers import find_decoder_blocks
from capllm.solvers.obs import obs_entry_gain
from capllm.utils import cache_dir


@dataclass(frozen=True)
class Stage1Options:
    stage1_dir: str = ""  # reuse a `capllm decompose --out DIR` cache ("" = automatic cache)
    # measured defaults (BENCHMARKS.md, CAP section): with the paper's λ = 1/√max(m, n) on W itself
    # the pools reach 50 % with several times the layer-output error of λ/2 on W·diag(√E x²)
    lam_scale: float = 0.5  # λ = lam_scale / sqrt(max(m, n))
    act_aware: bool = True  # decompose W·diag(sqrt(E x_j²)), then un-scale
    rpca_max_iter: int = 0  # 0 = the decomposition's default
    rpca_tol: float = 1e-7


def rpca_config(o: Stage1Options):
    from capllm.decompose import RPCAConfig

    kw = {"lam_scale": o.lam_scale, "tol": o.rpca_tol}
    if o.rpca_max_iter:
        kw["max_iter"] = o.rpca_max_iter
    return RPCAConfig(**kw)


def _fingerprint(ctx, o: Stage1Options) -> str:
    src = getattr(ctx.model, "_capllm_source", None)
    if src is None:  # an in-memory model: fingerprint its decoder weights
        h = hashlib.sha256()
        for hd in ctx.linears:
            w = hd.weight()
            h.update(str(tuple(w.shape)).encode())
            h.update(w.reshape(-1)[:: max(1, w.numel() // 4096)].float().contiguous().numpy().tobytes())
        src = h.hexdigest()
    cal = ctx.calibration.describe() if (o.act_aware and ctx.calibration is not None) else None
    key = json.dumps([src, o.lam_scale, o.act_aware, o.rpca_max_iter, o.rpca_tol, cal], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def stage1_dir(ctx, o: Stage1Options) -> Path:
    return Path(o.stage1_dir) if o.stage1_dir else cache_dir() / "stage1" / _fingerprint(ctx, o)


class _GramOnly:
    """Accumulates a linear's input moments; ``compress`` is never called (statistics pass)."""

    def __init__(self, n_in: int, device, full: bool) -> None:
        self.stats = InputStats(n_in, device, sq=not full, gram=full)

    def add_batch(self, inp, out) -> None:
        self.stats.add_batch(inp)

    def reduce(self, dist) -> None:
        self.stats.reduce(dist)

    def moment(self) -> torch.Tensor:
        return self.stats.gram if self.stats.gram is not None else self.stats.sq.float()

    def free(self) -> None:
        self.stats.free()


class Stage1Pass:
    """The engine pass of the module docstring (``modifies_weights = False``)."""

    name = "cap-stage1"
    needs_calibration = True
    modifies_weights = False
    distributed_finish = True  # several processes: statistics reduced by the engine; rank 0 decomposes and writes

    def __init__(self, o: Stage1Options, out_dir: Path, store: CapStore, full_gram: bool, keep_gram: bool, timer, progress: bool,
                 entry_gain: bool = False) -> None:
        self.o, self.out_dir, self.store = o, out_dir, store
        self.full, self.keep_gram, self.entry_gain = full_gram, keep_gram, entry_gain
        self.cfg = rpca_config(o)
        self.timer, self.progress = timer, progress

    def layer_compressor(self, handle):
        return _GramOnly(handle.shape[1], handle.module.weight.device, self.full)

    def finish_block(self, ctx, index: int, handles: list, comps: dict) -> dict:
        from capllm.decompose.cache import decompose_model, load_decomposition

        moments = {h.name: comps[h.name].moment().float().cpu() for h in handles}
        for c in comps.values():
            c.free()
        scales = None
        if self.o.act_aware:
            scales = {k: (A.diagonal() if A.dim() == 2 else A).clamp_min(0).sqrt() for k, A in moments.items()}
        with self.timer.stage("stage1_rpca"):
            # (the calibration is in the cache's fingerprint; the manifest reads as earlier versions wrote it)
            # several processes: the block's matrices are divided among the ranks
            decompose_model(ctx.model, self.cfg, self.out_dir, col_scales=scales, progress=False, device=ctx.device, names=[h.name for h in handles], dist=ctx.dist)
        if not ctx.dist.is_main:  # the block's statistics are the same on every rank: rank 0 writes them
            ctx.dist.barrier()
            return {}
        stats, gains = {}, []
        for h in handles:
            V = load_decomposition(self.out_dir, h.name).V
            vcv, adiag = reduce_gram(moments[h.name], V)
            stats[h.name] = {"adiag": adiag.float(), "vcv": vcv.float()}
            if self.entry_gain:  # 1 / [A⁻¹]_jj, once per distinct input (q/k/v and gate/up share theirs)
                same = next((g for k, g in gains if torch.equal(moments[k], moments[h.name])), None)
                stats[h.name]["gain"] = same.clone() if same is not None else obs_entry_gain(moments[h.name]).float()
                gains.append((h.name, stats[h.name]["gain"]))
            if self.keep_gram:
                stats[h.name]["gram"] = moments[h.name]
        self.store.save_block_stats(index, stats)
        ctx.dist.barrier()
        return {}


def run_stage1(ctx, o: Stage1Options, store: CapStore, full_gram: bool, keep_inputs: bool, keep_gram: bool = False, entry_gain: bool = False) -> Path:
    """Statistics and Stage 1 of every block (resumable); returns the Stage 1 cache directory.
    ``entry_gain`` also keeps ``1 / [A⁻¹]_jj`` of every linear (the ``obs`` entry score; needs ``full_gram``)."""
    from capllm.engine.layerwise import run_layerwise

    out = stage1_dir(ctx, o)
    if store.stage("stage1") is not None:
        return out
    stage = Stage1Pass(o, out, store, full_gram, keep_gram, ctx.timer, ctx.progress, entry_gain=entry_gain)
    on_inputs = None
    if keep_inputs:
        nblocks = len(find_decoder_blocks(ctx.model)[1])

        def on_inputs(i, hidden):
            store.save_inputs(i if i < nblocks else None, hidden)
    run_layerwise(ctx, stage, checkpoint=ctx.checkpoint("cap-stage1"), on_block_inputs=on_inputs, desc="CAP stage 1: statistics + robust PCA")
    if ctx.dist.is_main:
        store.finish_stage("stage1", {"stage1_dir": str(out)})
    ctx.dist.barrier()
    return out


def run_stage1_without_data(ctx, o: Stage1Options) -> Path:
    """Stage 1 of every matrix when no statistic is needed (``act_aware=False``, data-free scores)."""
    from capllm.decompose.cache import decompose_model

    out = stage1_dir(ctx, o)
    with ctx.timer.stage("stage1_rpca"):
        decompose_model(ctx.model, rpca_config(o), out, progress=ctx.progress, device=ctx.device)
    return out


def load_pool(out_dir: Path, name: str, shape: tuple[int, int]) -> MatrixPool:
    """One matrix's Stage 1 result from the cache, as a candidate pool."""
    from capllm.decompose.cache import load_decomposition

    r = load_decomposition(out_dir, name)
    return MatrixPool(name, shape, r.U.float(), r.sigma.float(), r.V.float(), r.S.float())
