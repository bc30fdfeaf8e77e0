"""Singular value thresholding (SVT) kernels for the robust-PCA iteration, batched.

The ``L``-step of the inexact ALM is ``L = SVT_τ(X) = U diag((σ − τ)₊) Vᵀ`` for ``X = U diag(σ) Vᵀ``.
Every kernel here takes a stack of *tall* matrices ``X (B, m, n)``, ``m ≥ n`` (the caller
transposes wide ones), a threshold per matrix ``τ (B,)``, and returns :class:`Spectrum` — right
singular vectors ``V (B, n, k)`` with singular values ``σ (B, k)`` in descending order, of which
every value ``> τ`` is present (values beyond a matrix's rank may be zero padding). ``L`` is then

    L = X V diag(w) Vᵀ,   w_i = (σ_i − τ)₊ / σ_i          (``X V_i = σ_i U_i``)

so no left factor is needed inside the loop (:func:`apply_svt`).

* :func:`spectrum_svd` — LAPACK SVD (``gesdd``) of ``X``; the textbook path, the reference.
* :func:`spectrum_gram` — eigendecomposition of the ``n × n`` Gram matrix ``G = XᵀX`` (``σ² = eig(G)``).
  ``G`` squares the condition number, so it is formed and decomposed in float64: an eigenvalue
  error of ``ε₆₄‖X‖₂²`` moves a singular value ``σ`` by ``ε₆₄‖X‖₂²/(2σ)``, below ``1e-10‖X‖₂``
  even for ``σ`` at the final thresholds (~``1e-6‖X‖₂``). float32 is *not* safe here: measured on
  SmolLM2 weights it changes the final ``L``/``S`` by 1e-6…5e-4 and densifies ``S``.
  On a CPU thread with one intra-op thread (how the model-level workers run) the Gram and the
  eigendecomposition go through NumPy (:func:`gram`, :func:`eigh`); otherwise through torch.
* :func:`spectrum_partial` — only the leading ``k`` eigenpairs of ``G``, by a randomized block
  Krylov subspace (warm-started with the previous iteration's vectors) and Rayleigh–Ritz. It is
  accepted only when (a) its smallest Ritz value is ``≤ τ²`` — so every singular value above the
  threshold was captured — and (b) every Ritz pair above the threshold has a residual
  ``‖G v − θ v‖ ≤ tol·‖G‖₂``; otherwise the caller falls back to the full Gram eigendecomposition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from threadpoolctl import threadpool_limits


@dataclass
class Spectrum:
    """``σ (B, k)`` descending, ``V (B, n, k)``; ``kind`` names the kernel that produced it."""

    sigma: torch.Tensor
    V: torch.Tensor
    kind: str
    U: torch.Tensor | None = None  # (B, m, k) when the kernel has it for free (the SVD)


def spectrum_svd(X: torch.Tensor) -> Spectrum:
    """All singular triplets of tall ``X`` by LAPACK/cuSOLVER SVD."""
    U, s, Vh = torch.linalg.svd(X, full_matrices=False)
    return Spectrum(s, Vh.mT, "full", U)


def gram(X: torch.Tensor) -> torch.Tensor:
    """``XᵀX`` in float64, exactly symmetric.

    On one CPU thread (:func:`_numpy_kernels`) the product goes through NumPy, whose ``a.T @ a``
    is a BLAS ``syrk`` (half the flops of the general product torch uses: 13 vs 23 ms for
    1536×576 on one core) and releases the GIL, so worker threads still run side by side.
    """
    X64 = X.detach().to(torch.float64)
    if _numpy_kernels(X64):
        A = X64.numpy()
        n = A.shape[-1]
        G = np.stack([_syrk(a) for a in A.reshape(-1, *A.shape[-2:])])
        return torch.from_numpy(G.reshape(*A.shape[:-2], n, n))
    G = X64.mT @ X64
    return 0.5 * (G + G.mT)


def _numpy_kernels(t: torch.Tensor) -> bool:
    """NumPy's kernels for a CPU tensor when torch runs this thread on one intra-op thread (a
    worker of :func:`capllm.decompose.rpca.map_in_threads`, or ``torch.set_num_threads(1)``).

    With more threads, alternating between torch's OpenMP pool and OpenBLAS's own threads makes
    each spin on the cores the other needs: measured on 2 cores, one IALM iteration of a 1536×576
    matrix took 111 ms that way against 74 ms with torch's kernels alone
    (``benchmarks/rpca_speed.py kernels --threads 2``).
    """
    return t.device.type == "cpu" and torch.get_num_threads() == 1


def blas_threads(n: int):
    """Context limiting NumPy's BLAS/LAPACK (used by :func:`gram` and :func:`eigh` on a CPU) to
    ``n`` threads — the same count torch's intra-op pool has, so worker threads do not
    oversubscribe the cores. The setting is process-wide: the worker pool sets it before its
    threads start; a worker setting the same count again (on entry and exit) changes nothing."""
    return threadpool_limits(limits=max(1, int(n)), user_api="blas")


def _syrk(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.T @ a  # NumPy detects the transposed self-product and calls syrk (symmetric result)


def eigh(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and vectors of a symmetric float64 stack.

    On one CPU thread (:func:`_numpy_kernels`) through NumPy's LAPACK ``syevd`` (42 ms vs 50 ms
    for torch's at n = 576, same algorithm; the GIL is released); elsewhere ``torch.linalg.eigh``.
    """
    if _numpy_kernels(G):
        w, v = np.linalg.eigh(G.detach().numpy())
        return torch.from_numpy(w), torch.from_numpy(v)
    return torch.linalg.eigh(G)


def spectrum_gram(X: torch.Tensor, G: torch.Tensor | None = None) -> Spectrum:
    """All singular values and right vectors of tall ``X`` from ``eigh(XᵀX)`` in float64."""
    G = gram(X) if G is None else G
    evals, evecs = eigh(G)
    sigma = evals.flip(-1).clamp_min(0).sqrt()
    return Spectrum(sigma, evecs.flip(-1), "gram")


def spectrum_partial(
    G: torch.Tensor,
    tau: torch.Tensor,
    k: int,
    V0: torch.Tensor | None,
    generator: torch.Generator | None,
    max_dim: int,
    tol: float = 1e-12,
) -> Spectrum | str:
    """Leading ``k`` eigenpairs of the Gram stack ``G (B, n, n)``, or why not: ``"too large"``
    (``4k > max_dim``), ``"missed"`` (more than ``k`` values above the threshold) or
    ``"unconverged"`` (not accurate enough within ``max_dim``).

    The search space is the block Krylov space ``[Ω, GΩ, G²Ω, …]`` (each block orthogonalised
    twice against the earlier ones) started from ``Ω = [V0 | Gaussian]`` with ``k`` columns; it
    grows until Rayleigh–Ritz on it passes the acceptance test or its dimension would exceed
    ``max_dim``. Acceptance, per matrix: the ``k``-th Ritz value is ``≤ τ²`` (Ritz values are
    lower bounds, and with converged pairs nothing above the threshold was missed) and every
    Ritz pair above ``τ²`` has residual ``‖G v − θ v‖ ≤ tol·θ₁``. Small blocks with a deep Krylov
    space converge far faster than subspace iteration on the flat spectra of weight matrices.
    """
    B, n, _ = G.shape
    if 4 * k > max_dim:
        return "too large"
    omega = torch.randn(B, n, k, dtype=G.dtype, device=G.device, generator=generator)
    if V0 is not None:
        j = min(k, V0.shape[-1])
        omega[..., :j] = V0[..., :j].to(G.dtype)
    tau2 = (tau.to(G.dtype) ** 2).view(B, 1)
    basis = torch.linalg.qr(omega).Q
    Q = basis
    check_at = 4 * k  # Rayleigh–Ritz at dimensions 4k, 6k, 9k, … (each costs a small eigh)
    while basis.shape[-1] + k <= max_dim:
        Q = G @ Q
        for _ in range(2):  # block Gram–Schmidt, twice is enough
            Q = Q - basis @ (basis.mT @ Q)
        Q = torch.linalg.qr(Q).Q
        basis = torch.cat([basis, Q], dim=-1)
        if basis.shape[-1] < check_at and basis.shape[-1] + k <= max_dim:
            continue
        check_at = basis.shape[-1] * 3 // 2
        H = basis.mT @ G @ basis
        theta, Wr = torch.linalg.eigh(0.5 * (H + H.mT))
        theta, Wr = theta.flip(-1)[..., :k], Wr.flip(-1)[..., :k]
        if not bool((theta[..., -1:] <= tau2).all()):
            return "missed"  # more than k values above the threshold: the caller may grow k
        V = basis @ Wr
        resid = torch.linalg.vector_norm(G @ V - V * theta.unsqueeze(-2), dim=-2)
        if not bool(((resid > tol * theta[..., :1]) & (theta > tau2)).any()):
            return Spectrum(theta.clamp_min(0).sqrt(), V, "partial")
    return "unconverged"


def apply_svt(X: torch.Tensor, spec: Spectrum, tau: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``L = SVT_τ(X)`` from a spectrum of ``X`` (see the module docstring); returns ``(L, r_max)``.

    Only the leading ``r_max`` = the largest count of ``σ > τ`` in the batch columns are used.
    """
    tau = tau.to(spec.sigma.dtype).view(-1, 1)
    keep = spec.sigma > tau
    r = int(keep.sum(-1).max())
    if r == 0:
        return torch.zeros_like(X), 0
    s = spec.sigma[..., :r]
    V = spec.V[..., :r].to(X.dtype)
    shrunk = (s - tau).clamp_min(0)
    if spec.U is not None:
        return (spec.U[..., :r] * shrunk.unsqueeze(-2).to(X.dtype)) @ V.mT, r
    w = torch.where(s > tau, shrunk / s.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s)).to(X.dtype)
    m, n = X.shape[-2:]
    if n * r + m * n < 2 * m * r:  # fewer flops: L = X·(V diag(w) Vᵀ)
        return X @ ((V * w.unsqueeze(-2)) @ V.mT), r
    return ((X @ V) * w.unsqueeze(-2)) @ V.mT, r
