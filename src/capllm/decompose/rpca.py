"""Robust PCA ``W = L + S`` by the inexact augmented Lagrangian method (CAP Stage 1, DESIGN §1).

Problem (Candès, Li, Ma, Wright 2011, "principal component pursuit")::

    min ‖L‖_* + λ‖S‖₁   s.t.  W = L + S,        λ = lam_scale / sqrt(max(m, n))

Iteration (Lin, Chen, Ma 2010, arXiv 1009.5055, Algorithm 5 — L first, then S)::

    Y₀ = W / max(‖W‖₂, ‖W‖_∞ / λ),  S₀ = 0,  μ₀ = 1.25 / ‖W‖₂,  μ_max = 1e7 · μ₀
    L ← SVT_{1/μ}(W − S + Y/μ)              singular value thresholding
    S ← shrink_{λ/μ}(W − L + Y/μ)           elementwise soft threshold
    Y ← Y + μ (W − L − S);   μ ← min(ρ μ, μ_max),   ρ = 1.5
    stop when ‖W − L − S‖_F / ‖W‖_F < tol (1e-7) or after max_iter iterations.

(``‖W‖_∞`` is the largest absolute entry, as in the authors' ``inexact_alm_rpca.m``.) Because
``Y ← μ·clip(W − L + Y/μ, ±λ/μ)`` the residual is ``O(λ√(mn)/μ)`` whatever ``L`` is, so the
iteration count is set by the μ schedule (33–39 on SmolLM2 weights); the *quality* of ``L`` and
``S`` is set by the accuracy of the SVT. The iteration is trajectory-dependent (μ grows
geometrically), so a sloppy SVT does not wash out: measured, float32 SVT steps change the final
``L``/``S`` by 1e-6…5e-4 (relative) and make ``S`` almost dense. Hence the state (``W, S, Y``) and
the SVT run in float64; the results are returned in float32.

Speed (all paths give the same ``L``/``S`` to ~1e-7 in fp32 outputs; tested against the plain
reference :func:`capllm.decompose.reference.rpca_reference`):

* ``svd="full"``: LAPACK SVD of ``W − S + Y/μ`` each iteration (the reference numerics).
* ``svd="gram"``: float64 ``eigh`` of the ``n × n`` Gram matrix of the tall orientation
  (:func:`capllm.decompose.svt.spectrum_gram`) — no bidiagonalisation, mostly BLAS-3. On a CPU
  thread with one intra-op thread (the workers' layout) the Gram is a BLAS ``syrk`` and the
  ``eigh`` LAPACK ``syevd``, both through NumPy (half the Gram flops, and NumPy's ``syevd`` is
  ~15 % faster than torch's call of it); with more threads, and on a GPU, torch's own.
* ``svd="partial"`` / ``"auto"`` (default): the rank predictor of Lin et al. (PROPACK style) —
  start with ``sv = min(10, n)``; after each step with ``svp`` values above ``1/μ``:
  ``sv = svp + 1`` if ``svp < sv`` else ``svp + round(0.05 n)``. The step first tries only the
  leading ``k = sv + 8`` pairs by a warm-started block Krylov method on the float64 Gram matrix
  (:func:`capllm.decompose.svt.spectrum_partial`) whose basis may grow to
  ``partial_max_frac · n`` (default n/2; so ``k ≤ n/8``: the rule "predicted rank small").
  A partial result is *accepted only if* its ``k``-th value is already ``≤ 1/μ`` (nothing above
  the threshold was missed) and every Ritz pair above the threshold has a residual
  ``≤ 1e-12‖G‖₂``. If values were missed, ``k`` is doubled once; otherwise (or then) the step
  falls back to the full Gram decomposition, and after a non-converged attempt the next
  ``2^f`` steps do not try (``f`` = failures so far). On SmolLM2 weights ``rank(L)`` passes n/8
  by the 3rd–4th iteration and ends at 60–73 % of full, so the partial step serves only the
  first 1–2 iterations and saves nothing measurable there (it does on genuinely low-rank
  problems); the float64 Gram path is what makes the other iterations cheaper than LAPACK SVD.

Activation-aware option: with ``col_scale = d`` (``d_j = sqrt(E x_j²)``) the decomposition is of
``W·diag(d)``, then un-scaled: ``L = U diag(σ) (diag(1/d) V)ᵀ``, ``S = S'·diag(1/d)`` — ``V``
absorbs the un-scaling (its columns are then not unit).
"""

from __future__ import annotations

import dataclasses
import math
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Iterator

import torch

from capllm.decompose.svt import Spectrum, apply_svt, blas_threads, gram, spectrum_gram, spectrum_partial, spectrum_svd
from capllm.errors import CapllmError

SVD_MODES = ("auto", "partial", "gram", "full")
_OVERSAMPLE = 8


@dataclass(frozen=True)
class RPCAConfig:
    """Options of :func:`rpca` (defaults = the standard IALM of Lin et al.).

    * ``lam``: λ; ``None`` → ``lam_scale / sqrt(max(m, n))``.
    * ``lam_scale``: multiplies the default λ (larger → sparser ``S``, higher-rank ``L``).
    * ``tol``: stop when ``‖W − L − S‖_F / ‖W‖_F < tol`` (0: run exactly ``max_iter`` iterations).
    * ``max_iter``: iteration cap (the paper's Figure 2 uses 1, 3, 10, 100).
    * ``mu0``: initial μ; ``None`` → ``1.25 / ‖W‖₂``. ``rho``: μ growth per iteration.
      ``mu_max_factor``: ``μ_max = mu_max_factor · μ₀``. A larger ``rho`` (2–3) needs fewer
      iterations but is a different, less exact trajectory — an option, not the default.
    * ``svd``: SVT kernel, one of ``auto`` (= ``partial``), ``partial``, ``gram``, ``full`` (module docstring).
    * ``partial_max_frac``: the Krylov basis of the partial step may grow to this fraction of
      ``n`` (it needs at least ``4k``); beyond, the step is a full decomposition.
    * ``dtype``: working precision of the state and SVT (``float64``; ``float32`` stalls near
      a relative residual of 1e-7 and is not exact).
    * ``seed``: seeds the random start block of the partial step (results are deterministic).
    """

    lam: float | None = None
    lam_scale: float = 1.0
    tol: float = 1e-7
    max_iter: int = 100
    mu0: float | None = None
    rho: float = 1.5
    mu_max_factor: float = 1e7
    svd: str = "auto"
    partial_max_frac: float = 0.5
    dtype: str = "float64"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.svd not in SVD_MODES:
            raise CapllmError(f"unknown svd mode {self.svd!r}: use one of {', '.join(SVD_MODES)}")
        if self.dtype not in ("float64", "float32"):
            raise CapllmError(f"dtype {self.dtype!r} not supported: use float64 or float32")
        if not (self.tol >= 0 and self.max_iter >= 1 and self.rho >= 1.0 and self.lam_scale > 0 and self.mu_max_factor >= 1):
            raise CapllmError(f"invalid RPCA options: need tol ≥ 0, max_iter ≥ 1, rho ≥ 1, lam_scale > 0, mu_max_factor ≥ 1 (got tol={self.tol}, max_iter={self.max_iter}, rho={self.rho}, lam_scale={self.lam_scale}, mu_max_factor={self.mu_max_factor})")
        if self.lam is not None and not self.lam > 0:
            raise CapllmError(f"lam must be positive (got {self.lam})")
        if self.mu0 is not None and not self.mu0 > 0:
            raise CapllmError(f"mu0 must be positive (got {self.mu0})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RPCAResult:
    """One matrix ``W (m, n) ≈ L + S`` with ``L = U diag(σ) Vᵀ``; tensors fp32 on the compute device."""

    U: torch.Tensor  # (m, r) left singular vectors of L
    sigma: torch.Tensor  # (r,) descending
    V: torch.Tensor  # (n, r): unit columns unless col_scale was used
    S: torch.Tensor  # (m, n) dense with zeros off the support
    iterations: int
    residual: float  # ‖W − L − S‖_F / ‖W‖_F of the final iterate (float64 arithmetic)
    converged: bool
    lam: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rank(self) -> int:
        return int(self.sigma.numel())

    @property
    def nnz(self) -> int:
        return int(torch.count_nonzero(self.S))

    def L(self) -> torch.Tensor:
        return (self.U * self.sigma) @ self.V.T

    def dense(self) -> torch.Tensor:
        return self.L() + self.S


# ----------------------------------------------------------------------------------------------
# input checks


def _check_matrix_stack(W: torch.Tensor, what: str, batched: bool) -> None:
    if not isinstance(W, torch.Tensor):
        raise CapllmError(f"{what} must be a torch.Tensor (got {type(W).__name__})")
    want = 3 if batched else 2
    if W.dim() != want:
        raise CapllmError(f"{what} must be a {want}-D tensor ({'(B, m, n)' if batched else '(m, n)'}), got shape {tuple(W.shape)}")
    if W.numel() == 0:
        raise CapllmError(f"{what} is empty (shape {tuple(W.shape)}): nothing to decompose")
    if not W.is_floating_point():
        raise CapllmError(f"{what} has dtype {W.dtype}: robust PCA needs a floating-point weight (convert with .float())")
    if not bool(torch.isfinite(W).all()):
        bad = int((~torch.isfinite(W)).sum())
        raise CapllmError(f"{what} has {bad} NaN/Inf entries: fix or re-load the weights before decomposing")


def _check_scale(d: torch.Tensor, B: int, n: int, batched: bool) -> torch.Tensor:
    if not isinstance(d, torch.Tensor) or not d.is_floating_point():
        raise CapllmError("col_scale must be a floating-point tensor of per-input-channel scales")
    d = d.reshape(1, -1) if (not batched and d.dim() == 1) else d
    if d.shape != (B, n):
        raise CapllmError(f"col_scale has shape {tuple(d.shape)}, expected {(B, n) if batched else (n,)} (one scale per input column)")
    if not bool(torch.isfinite(d).all()) or bool((d < 0).any()) or bool((d.amax(-1) <= 0).any()):
        raise CapllmError("col_scale must be finite, non-negative and not all zero (use sqrt(E[x²]) of the layer's inputs)")
    # a channel that never fires would make the un-scaling 0/0: floor it at 1e-6 of the largest
    return torch.maximum(d, d.amax(-1, keepdim=True) * 1e-6)


# ----------------------------------------------------------------------------------------------
# the batched iteration


def _spectral_norm(W: torch.Tensor) -> torch.Tensor:
    """‖W_b‖₂ for a tall float64 stack, from the Gram's largest eigenvalue."""
    return torch.linalg.eigvalsh(gram(W))[..., -1].clamp_min(0).sqrt()


def _factor(X: torch.Tensor, spec: Spectrum, tau: float, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact SVD factors ``(U, σ, V)`` of ``L = SVT_τ(X)`` for one tall matrix, rank ``r``."""
    if r == 0:
        m, n = X.shape
        return X.new_zeros(m, 0), X.new_zeros(0), X.new_zeros(n, 0)
    s = spec.sigma[:r]
    V = spec.V[:, :r].to(X.dtype)
    if spec.U is not None:
        return spec.U[:, :r], s - tau, V
    # X V_r diag(1 − τ/σ) = U_r diag(σ − τ): columns orthogonal in exact arithmetic; QR + a small
    # SVD make U orthonormal to working precision even for σ close to τ.
    Bm = (X @ V) * ((s - tau) / s).to(X.dtype)
    Q, R = torch.linalg.qr(Bm)
    P, sig, Ht = torch.linalg.svd(R)
    return Q @ P, sig, V @ Ht.mT


def _update_predictor(sv: torch.Tensor, svp: torch.Tensor, n: int) -> torch.Tensor:
    """Lin et al.'s rank prediction for the next SVT step."""
    grow = svp + max(1, round(0.05 * n))
    return torch.where(svp < sv, svp + 1, grow).clamp(max=n)


def _svt_step(X, tau, cfg: RPCAConfig, sv, V_prev, gen, state: dict):
    """One thresholding step for the active stack: returns (Spectrum, kind).

    After a partial step fails to converge (the spectrum at the threshold is too dense for the
    Krylov budget) the next ``2^f`` steps skip it (``f`` = failures so far), so failed attempts
    cost little on real weights, where the rank soon grows past the partial range anyway.
    """
    B, m, n = X.shape
    if cfg.svd == "full":
        return spectrum_svd(X), "full"
    G = gram(X)
    skip = state.get("skip", 0)
    state["skip"] = max(0, skip - 1)
    if cfg.svd in ("auto", "partial") and skip == 0:
        k = int(sv.max()) + _OVERSAMPLE
        max_dim = int(cfg.partial_max_frac * n)
        for attempt in range(2):
            spec = spectrum_partial(G, tau, k, V_prev, gen, max_dim)
            if isinstance(spec, Spectrum):
                return spec, "partial"
            if spec == "unconverged":
                state["fails"] = state.get("fails", 0) + 1
                state["skip"] = 2 ** state["fails"]
            if spec != "missed":
                break
            k *= 2  # grow the block once
    return spectrum_gram(X, G), "full"


def _ialm(W: torch.Tensor, lam: torch.Tensor, cfg: RPCAConfig, progress_cb=None) -> list[dict]:
    """Run the iteration on a tall float stack ``W (B, m, n)``; per-matrix results as dicts."""
    B, m, n = W.shape
    dt = W.dtype
    norm2 = _spectral_norm(W.to(torch.float64)).to(dt)
    normF = torch.linalg.matrix_norm(W.to(torch.float64))
    norm_inf = W.abs().amax((-2, -1)) / lam
    mu = (torch.full_like(norm2, cfg.mu0) if cfg.mu0 is not None else 1.25 / norm2).to(dt)
    mu_max = mu * cfg.mu_max_factor
    Y = W / torch.maximum(norm2, norm_inf).view(B, 1, 1)
    S = torch.zeros_like(W)
    sv = torch.full((B,), min(10, n), dtype=torch.long, device=W.device)
    gen = torch.Generator(device=W.device).manual_seed(cfg.seed)
    V_prev = None
    svt_state: dict = {}
    idx = list(range(B))  # original batch positions of the active rows
    hist: list[list[dict]] = [[] for _ in range(B)]
    done: dict[int, dict] = {}
    lam = lam.to(dt)

    for it in range(1, cfg.max_iter + 1):
        inv_mu = (1.0 / mu).view(-1, 1, 1)
        A = torch.addcmul(W, Y, inv_mu)  # W + Y/μ
        X = A - S
        spec, kind = _svt_step(X, 1.0 / mu, cfg, sv, V_prev, gen, svt_state)
        L, _ = apply_svt(X, spec, 1.0 / mu)
        T = A.sub_(L)  # W − L + Y/μ
        thr = (lam / mu).view(-1, 1, 1)
        C = torch.clamp(T, -thr, thr)
        S = T.sub_(C)  # shrink_{λ/μ}(T) = T − clip(T, ±λ/μ)
        Z = torch.addcmul(C, Y, inv_mu, value=-1)  # W − L − S = clip(T) − Y/μ
        res = (torch.linalg.vector_norm(Z.to(torch.float64), dim=(-2, -1)) / normF).cpu()
        del Z
        Y = C.mul_(mu.view(-1, 1, 1))  # Y + μ(W − L − S) = μ·clip(T)
        svp = (spec.sigma > (1.0 / mu).view(-1, 1).to(spec.sigma.dtype)).sum(-1)
        nnz = torch.count_nonzero(S, dim=(-2, -1)).cpu()
        for j, b in enumerate(idx):
            hist[b].append({"rank": int(svp[j]), "nnz": int(nnz[j]), "residual": float(res[j]), "mu": float(mu[j]), "svd": kind})
        sv = _update_predictor(sv, svp.to(sv.device), n)
        V_prev = spec.V[..., : int(svp.max()) + _OVERSAMPLE]  # warm start of the next partial step

        finished = [j for j in range(len(idx)) if float(res[j]) < cfg.tol or it == cfg.max_iter]
        for j in finished:
            b = idx[j]
            tau = float(1.0 / mu[j])
            r = int(svp[j])
            one = Spectrum(spec.sigma[j], spec.V[j], spec.kind, None if spec.U is None else spec.U[j])
            U_, s_, V_ = _factor(X[j], one, tau, r)
            done[b] = {"U": U_, "sigma": s_, "V": V_, "S": S[j], "iterations": it, "residual": float(res[j]), "converged": float(res[j]) < cfg.tol}
        if finished:
            keep = [j for j in range(len(idx)) if j not in finished]
            if not keep:
                break
            sel = torch.tensor(keep, device=W.device)
            W, S, Y, mu, mu_max, lam, normF = W[sel], S[sel], Y[sel], mu[sel], mu_max[sel], lam[sel], normF[sel]
            sv = sv[sel]
            V_prev = None if V_prev is None else V_prev[sel]
            idx = [idx[j] for j in keep]
        mu = torch.minimum(mu * cfg.rho, mu_max)
        if progress_cb is not None:
            progress_cb(it)
    for b in range(B):
        done[b]["history"] = hist[b]
    return [done[b] for b in range(B)]


# ----------------------------------------------------------------------------------------------
# public API


def _resolve_config(config: RPCAConfig | None, overrides: dict) -> RPCAConfig:
    defaults = {f.name: f.default for f in dataclasses.fields(RPCAConfig)}
    changed = {k: v for k, v in overrides.items() if v != defaults[k]}
    if config is None:
        return RPCAConfig(**overrides)
    if changed:
        raise CapllmError(f"pass either config= or keyword options to rpca, not both (got config and {sorted(changed)})")
    return config


def map_in_threads(fn, items: list, workers: int) -> Iterator[tuple[int, object]]:
    """``(index, fn(item))`` in completion order, ``workers`` Python threads at a time.

    Each worker gets ``max(1, torch.get_num_threads() // workers)`` intra-op threads (a per-thread
    setting), so the caller's total stays the same: on a CPU, whole matrices in parallel scale
    far better than one matrix's LAPACK calls on several threads, and do not collapse when the
    machine is busy. LAPACK/BLAS release the GIL. NumPy's BLAS (the Gram and ``eigh`` of the SVT
    step on a CPU) gets the same per-worker count, process-wide, for the life of the pool.
    """
    if workers <= 1 or len(items) <= 1:
        for i, it in enumerate(items):
            yield i, fn(it)
        return
    intra = max(1, torch.get_num_threads() // workers)
    with blas_threads(intra), ThreadPoolExecutor(max_workers=workers, initializer=torch.set_num_threads, initargs=(intra,)) as pool:
        futures = {pool.submit(fn, it): i for i, it in enumerate(items)}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()


@torch.no_grad()
def _decompose_stack(Ws: torch.Tensor, col_scale: torch.Tensor | None, cfg: RPCAConfig, dev: torch.device) -> list[RPCAResult]:
    B, m, n = Ws.shape
    wdt = torch.float64 if cfg.dtype == "float64" else torch.float32
    t0 = time.perf_counter()
    W = Ws.to(device=dev, dtype=wdt)
    d = None
    if col_scale is not None:
        d = _check_scale(col_scale.to(device=dev), B, n, batched=True).to(wdt)
        W = W * d.unsqueeze(-2)
    lam_val = cfg.lam if cfg.lam is not None else cfg.lam_scale / math.sqrt(max(m, n))
    wide = m < n
    Wt = W.mT.contiguous() if wide else W
    nonzero = [b for b in range(B) if bool(Wt[b].any())]
    outs: list = [None] * B
    if nonzero:
        sel = torch.tensor(nonzero, device=dev)
        with blas_threads(torch.get_num_threads()):  # NumPy's BLAS as many threads as torch's here
            for b, o in zip(nonzero, _ialm(Wt[sel], torch.full((len(nonzero),), lam_val, dtype=wdt, device=dev), cfg)):
                outs[b] = o
    for b in range(B):  # an all-zero matrix (a pruned layer): L = 0, S = 0, nothing to iterate
        if outs[b] is None:
            z = Wt[b]
            outs[b] = {"U": z.new_zeros(z.shape[0], 0), "sigma": z.new_zeros(0), "V": z.new_zeros(z.shape[1], 0), "S": torch.zeros_like(z),
                       "iterations": 0, "residual": 0.0, "converged": True, "history": []}
    seconds = (time.perf_counter() - t0) / B
    results = []
    for b, o in enumerate(outs):
        U, s, V, S = o["U"], o["sigma"], o["V"], o["S"]
        if wide:
            U, V, S = V, U, S.mT
        if d is not None:
            V = V / d[b].unsqueeze(-1)
            S = S / d[b].unsqueeze(-2)
        f32 = lambda t: t.to(torch.float32).contiguous()
        results.append(RPCAResult(f32(U), f32(s), f32(V), f32(S), o["iterations"], o["residual"], o["converged"], float(lam_val), o["history"], seconds))
    return results


def rpca_batched(
    Ws: torch.Tensor,
    lam: float | None = None,
    max_iter: int = RPCAConfig.max_iter,
    tol: float = RPCAConfig.tol,
    mu0: float | None = None,
    rho: float = RPCAConfig.rho,
    lam_scale: float = RPCAConfig.lam_scale,
    col_scale: torch.Tensor | None = None,
    svd: str = RPCAConfig.svd,
    device: torch.device | str | None = None,
    mu_max_factor: float = RPCAConfig.mu_max_factor,
    partial_max_frac: float = RPCAConfig.partial_max_frac,
    dtype: str = RPCAConfig.dtype,
    seed: int = RPCAConfig.seed,
    threads: int = 1,
    config: RPCAConfig | None = None,
) -> list[RPCAResult]:
    """Robust PCA of every matrix of a same-shape stack ``Ws (B, m, n)``; one IALM per matrix.

    On a GPU (or with ``threads=1``) the stack runs together, each step one batched kernel. On a
    CPU with ``threads > 1`` the matrices are spread over that many worker threads
    (:func:`map_in_threads`) — the faster choice there, since CPU LAPACK loops over a batch anyway.
    ``col_scale (B, n)``: activation-aware scales per matrix. Options as :class:`RPCAConfig` (or
    ``config=``). Results are fp32 on ``device`` (default: the device of ``Ws``).
    """
    cfg = _resolve_config(config, dict(lam=lam, max_iter=max_iter, tol=tol, mu0=mu0, rho=rho, lam_scale=lam_scale, svd=svd, mu_max_factor=mu_max_factor, partial_max_frac=partial_max_frac, dtype=dtype, seed=seed))
    _check_matrix_stack(Ws, "weight stack", batched=True)
    B, m, n = Ws.shape
    dev = torch.device(device) if device is not None else Ws.device
    if col_scale is not None:
        col_scale = _check_scale(col_scale, B, n, batched=True)
    if threads > 1 and dev.type == "cpu" and B > 1:
        cs = col_scale
        one = lambda b: _decompose_stack(Ws[b : b + 1], None if cs is None else cs[b : b + 1], cfg, dev)[0]
        out: list = [None] * B
        for b, r in map_in_threads(one, list(range(B)), threads):
            out[b] = r
        return out
    return _decompose_stack(Ws, col_scale, cfg, dev)


def rpca(
    W: torch.Tensor,
    lam: float | None = None,
    max_iter: int = RPCAConfig.max_iter,
    tol: float = RPCAConfig.tol,
    mu0: float | None = None,
    rho: float = RPCAConfig.rho,
    lam_scale: float = RPCAConfig.lam_scale,
    col_scale: torch.Tensor | None = None,
    svd: str = RPCAConfig.svd,
    device: torch.device | str | None = None,
    mu_max_factor: float = RPCAConfig.mu_max_factor,
    partial_max_frac: float = RPCAConfig.partial_max_frac,
    dtype: str = RPCAConfig.dtype,
    seed: int = RPCAConfig.seed,
    config: RPCAConfig | None = None,
) -> RPCAResult:
    """Robust PCA ``W ≈ U diag(σ) Vᵀ + S`` of one ``(m, n)`` matrix (module docstring)."""
    _check_matrix_stack(W, "weight", batched=False)
    cs = None
    if col_scale is not None:
        cs = _check_scale(col_scale, 1, W.shape[1], batched=False)
    return rpca_batched(W.unsqueeze(0), lam, max_iter, tol, mu0, rho, lam_scale, cs, svd, device, mu_max_factor, partial_max_frac, dtype, seed, 1, config)[0]
