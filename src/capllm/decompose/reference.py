"""The plain reference IALM: a full float64 LAPACK SVD every iteration, nothing else.

A direct transcription of Lin, Chen, Ma (2010), Algorithm 5, with the constants of the authors'
``inexact_alm_rpca.m`` (Y₀ = W / max(‖W‖₂, ‖W‖_∞/λ), μ₀ = 1.25/‖W‖₂, μ_max = 1e7·μ₀, ρ = 1.5),
in float64 as that code runs in double precision. It is the yardstick for :func:`capllm.decompose.rpca`
in the tests and in ``benchmarks/rpca_speed.py``; it is deliberately free of every speed-up
(except taking the SVD of the tall orientation, which LAPACK prefers).
"""

from __future__ import annotations

import math

import torch


def rpca_reference(W: torch.Tensor, lam: float | None = None, tol: float = 1e-7, max_iter: int = 100, rho: float = 1.5) -> dict:
    """``{"L", "S", "iterations", "residual", "converged", "ranks"}`` (float64 tensors)."""
    D = W.to(torch.float64)
    wide = D.shape[0] < D.shape[1]
    if wide:
        D = D.T
    m, n = D.shape
    lam = 1.0 / math.sqrt(max(m, n)) if lam is None else lam
    norm_two = float(torch.linalg.matrix_norm(D, ord=2))
    d_norm = float(torch.linalg.matrix_norm(D))
    Y = D / max(norm_two, float(D.abs().max()) / lam)
    S = torch.zeros_like(D)
    L = torch.zeros_like(D)
    mu = 1.25 / norm_two
    mu_bar = mu * 1e7
    ranks = []
    res = float("inf")
    it = 0
    for it in range(1, max_iter + 1):
        U, sig, Vh = torch.linalg.svd(D - S + Y / mu, full_matrices=False)
        svp = int((sig > 1.0 / mu).sum())
        L = U[:, :svp] @ torch.diag(sig[:svp] - 1.0 / mu) @ Vh[:svp]
        T = D - L + Y / mu
        S = torch.clamp(T - lam / mu, min=0) + torch.clamp(T + lam / mu, max=0)
        Z = D - L - S
        Y = Y + mu * Z
        mu = min(mu * rho, mu_bar)
        res = float(torch.linalg.matrix_norm(Z)) / d_norm
        ranks.append(svp)
        if res < tol:
            break
    if wide:
        L, S = L.T, S.T
    return {"L": L, "S": S, "iterations": it, "residual": res, "converged": res < tol, "ranks": ranks}
