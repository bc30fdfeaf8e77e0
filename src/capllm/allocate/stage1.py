"""Stage 1 for CAP's Stage 2: input statistics and RPCA candidate pools of a model.

``collect_grams`` runs the dense model once over the calibration windows and keeps each decoder
linear's input second moment ``E[x xᵀ]`` (or only its diagonal ``E[x_j²]``).
``stage1_pools`` decomposes every decoder linear by robust PCA (:mod:`capllm.decompose`),
through the resumable per-matrix cache — by default under
``$CAPLLM_CACHE/stage1/<model and options fingerprint>``, or a ``capllm decompose`` output
given as ``stage1_dir`` — and returns the :class:`~capllm.allocate.pools.CandidatePools`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from capllm.allocate.pools import CandidatePools, MatrixPool
from capllm.engine.stats import InputStats
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


def collect_output_grad_sq(ctx) -> dict[str, torch.Tensor]:
    """``{linear name: G = E[g_i²] (m,)}``, ``g = ∂ℒ/∂y`` of each linear's output, dense model.

    One forward and backward pass per calibration window with the token-mean cross-entropy
    ``ℒ``; no parameter gradients are formed (the graph starts at the input embeddings). With
    the input second moment ``A = E[x xᵀ]`` this is the K-FAC (Kronecker-factored Fisher)
    approximation of the loss curvature of each layer, used by the ``fisher`` scores.
    """
    import torch.nn.functional as F

    model = ctx.model
    sums = {h.name: torch.zeros(h.shape[0], dtype=torch.float64) for h in ctx.linears}
    count = 0

    def grad_hook(name):
        def accumulate(g):
            sums[name].add_(g.detach().reshape(-1, g.shape[-1]).double().pow(2).sum(0).cpu())

        def fn(mod, inp, out):
            if out.requires_grad:
                out.register_hook(accumulate)
        return fn

    hooks = [h.module.register_forward_hook(grad_hook(h.name)) for h in ctx.linears]
    was = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    model.to(ctx.device)
    emb = model.get_input_embeddings()
    try:
        for w in ctx.calibration.windows:
            ids = w.unsqueeze(0).to(ctx.device)
            x = emb(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=x, use_cache=False).logits[0, :-1].float()
            # summed (not mean) loss: per-token gradients, the empirical Fisher of the token losses
            F.cross_entropy(logits, ids[0, 1:], reduction="sum").backward()
            count += ids.shape[1] - 1
    finally:
        for hk in hooks:
            hk.remove()
        for p, r in zip(model.parameters(), was):
            p.requires_grad_(r)
    model.to("cpu")
    return {k: (v / count).float() for k, v in sums.items()}


@torch.no_grad()
def collect_grams(ctx, full: bool = True) -> dict[str, torch.Tensor]:
    """``{linear name: E[x xᵀ] (n × n)}`` (``full``) or ``{name: E[x_j²] (n,)}`` from the dense model."""
    stats = {h.name: InputStats(h.shape[1], torch.device("cpu"), sq=not full, gram=full) for h in ctx.linears}
    hooks = [h.module.register_forward_hook(lambda mod, inp, out, st=stats[h.name]: st.add_batch(inp[0].detach().cpu())) for h in ctx.linears]
    model = ctx.model
    model.to(ctx.device)
    try:
        for w in ctx.calibration.windows:
            model(w.unsqueeze(0).to(ctx.device), use_cache=False)
    finally:
        for hk in hooks:
            hk.remove()
    model.to("cpu")
    return {k: (s.gram if full else s.sq.float()) for k, s in stats.items()}


def _fingerprint(ctx, o: Stage1Options) -> str:
    src = getattr(ctx.model, "_capllm_source", None)
    if src is None:  # an in-memory model: fingerprint its decoder weights
        h = hashlib.sha256()
        for hd in ctx.linears:
            w = hd.weight()
            h.update(str(tuple(w.shape)).encode())
            h.update(w.reshape(-1)[:: max(1, w.numel() // 4096)].contiguous().numpy().tobytes())
        src = h.hexdigest()
    cal = ctx.calibration.describe() if (o.act_aware and ctx.calibration is not None) else None
    key = json.dumps([src, o.lam_scale, o.act_aware, o.rpca_max_iter, o.rpca_tol, cal], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def stage1_pools(ctx, o: Stage1Options, grams: dict[str, torch.Tensor] | None) -> CandidatePools:
    from capllm.decompose import RPCAConfig
    from capllm.decompose.cache import decompose_model, load_decomposition

    out = Path(o.stage1_dir) if o.stage1_dir else cache_dir() / "stage1" / _fingerprint(ctx, o)
    cfg_kwargs = {"lam_scale": o.lam_scale, "tol": o.rpca_tol}
    if o.rpca_max_iter:
        cfg_kwargs["max_iter"] = o.rpca_max_iter
    cfg = RPCAConfig(**cfg_kwargs)
    scales = None
    if o.act_aware:
        scales = {k: (g.diagonal() if g.dim() == 2 else g).clamp_min(0).sqrt() for k, g in grams.items()}
    decompose_model(ctx.model, cfg, out, col_scales=scales, progress=ctx.progress, device=ctx.device)
    mats = []
    for h in ctx.linears:
        r = load_decomposition(out, h.name)
        mats.append(MatrixPool(h.name, h.shape, r.U.float(), r.sigma.float(), r.V.float(), r.S.float()))
    return CandidatePools(mats)
