"""Shared low-rank math for the SVD-family baselines and the low-rank + sparse methods.

* :func:`rank_at_budget` — the largest rank whose factors fit a parameter count:
  ``r = ⌊params / (m + n)⌋`` (a rank-``r`` term ``U Vᵀ`` costs ``r(m + n)``), clamped to
  ``[0, min(m, n)]``.
* :func:`truncated_svd` — the top-``r`` singular triplets ``A ≈ U diag(σ) Vᵀ`` (full LAPACK SVD of the
  taller orientation, or ``torch.svd_lowrank`` when asked); :func:`fold` puts ``√σ`` into both
  factors, the form :class:`~capllm.methods.base.CompressedWeight` stores.
* :func:`whitening_factor` — the lower Cholesky factor ``Lc`` of ``H = E[x xᵀ]`` (fp64), with
  increasing diagonal jitter when ``H`` is not numerically positive definite (recorded).
* :func:`whitened_svd` — the closed-form minimiser of ``‖(A − Â)X‖_F`` over rank-``r`` ``Â``
  (SVD-LLM, Wang et al. 2024, arXiv 2403.07378): with ``XXᵀ/N = H = Lc Lcᵀ``,
  ``‖(A − Â)X‖²_F / N = ‖(A − Â)Lc‖²_F``, so the optimum is the rank-``r`` truncation of ``A·Lc``
  mapped back by ``Lc⁻¹``; its loss is the sum of the discarded squared singular values of ``A·Lc``.
* :func:`activation_error` — ``sqrt(tr(E H Eᵀ)) = ‖E X‖_F / √N`` for an error matrix ``E``.

CPU LAPACK calls (SVD, QR, Cholesky) run single-threaded (:func:`lapack_threads`): on the 2-core
reference machine a 2-thread MKL SVD of a 576×576 matrix is no faster than 1 thread when the
machine is idle, and 15–150× slower when another process competes for the cores (OpenMP
barrier spinning; measured 4.0 s vs 0.09 s). Matrix products keep every thread.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

LAPACK_THREADS = 1


@contextlib.contextmanager
def lapack_threads(tensor: torch.Tensor | None = None) -> Iterator[None]:
    """Run the enclosed CPU factorisations with :data:`LAPACK_THREADS` threads (no-op on GPU)."""
    old = torch.get_num_threads()
    if (tensor is not None and tensor.device.type != "cpu") or old <= LAPACK_THREADS:
        yield
        return
    torch.set_num_threads(LAPACK_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def rank_at_budget(m: int, n: int, params: float) -> int:
    """Largest ``r`` with ``r(m + n) ≤ params`` (at most ``min(m, n)``, at least 0)."""
    if params <= 0:
        return 0
    return max(0, min(min(m, n), int(params // (m + n))))


def truncated_svd(A: torch.Tensor, r: int, method: str = "full", niter: int = 4, oversample: int = 10):
    """Top-``r`` singular triplets of ``A (m, n)``: ``U (m, r)``, ``σ (r,)``, ``V (n, r)``.

    ``method="full"``: LAPACK SVD (of ``Aᵀ`` when ``A`` is wide, which is faster on CPU);
    ``"lowrank"``: randomized range finder (``torch.svd_lowrank`` with ``q = r + oversample`` and
    ``niter`` power iterations), worth it only when ``r ≪ min(m, n)``.
    """
    m, n = A.shape
    if r <= 0:
        return A.new_zeros(m, 0), A.new_zeros(0), A.new_zeros(n, 0)
    if method == "lowrank" and r + oversample < min(m, n):
        U, s, V = torch.svd_lowrank(A, q=r + oversample, niter=niter)
        return U[:, :r], s[:r], V[:, :r]
    with lapack_threads(A):
        if m < n:
            V, s, Uh = torch.linalg.svd(A.t(), full_matrices=False)
            return Uh[:r].t(), s[:r], V[:, :r]
        U, s, Vh = torch.linalg.svd(A, full_matrices=False)
    return U[:, :r], s[:r], Vh[:r].t()


def subspace_svd(A: torch.Tensor, basis: torch.Tensor, r: int):
    """Top-``r`` singular triplets of ``A`` from one block power step on a warm start ``basis (n, k)``.

    ``Q = orth(A·basis)``, then the exact SVD of the small ``Qᵀ A (k, n)`` (Rayleigh–Ritz).
    Returns ``(U, σ, V, next_basis)``; ``next_basis`` (``k`` right singular vectors) seeds the
    next call. When ``A`` changes little between calls (alternating minimisation), repeated calls
    are an orthogonal iteration that tracks the top-``r`` subspace at ``O(mnk)`` per call instead
    of a full SVD. Accuracy against the full SVD is measured, not assumed (see OATS).
    """
    Y = A @ basis
    with lapack_threads(A):
        Q = torch.linalg.qr(Y).Q
    B = Q.t() @ A
    with lapack_threads(A):
        Ub, s, Vh = torch.linalg.svd(B, full_matrices=False)
    U = Q @ Ub
    return U[:, :r], s[:r], Vh[:r].t(), Vh.t()


def fold(U: torch.Tensor, s: torch.Tensor, V: torch.Tensor):
    """``(U·√σ, V·√σ)`` so that ``U' V'ᵀ = U diag(σ) Vᵀ``."""
    root = s.clamp_min(0).sqrt()
    return U * root, V * root


def whitening_factor(H: torch.Tensor, max_tries: int = 12):
    """Lower Cholesky factor ``Lc`` (fp64) of ``H``, jittered until positive definite.

    Returns ``(Lc, jitter)``: ``Lc Lcᵀ = H + jitter·I``. Jitter starts at ``1e-10 · mean(diag H)``
    and grows tenfold per failed attempt (``jitter = 0`` when plain Cholesky succeeds). Dead inputs
    (``H_jj = 0``) always need jitter, so they are always reported.
    """
    H = H.to(torch.float64)
    n = H.shape[0]
    with lapack_threads(H):
        L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        return L, 0.0
    scale = float(H.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    for k in range(max_tries):
        jitter = scale * 10.0 ** (k - 10)
        with lapack_threads(H):
            L, info = torch.linalg.cholesky_ex(H + jitter * eye)
        if int(info) == 0:
            return L, jitter
    raise RuntimeError("input second-moment matrix is not positive definite even with jitter of 10× its mean diagonal")


def whitened_svd(A: torch.Tensor, Lc: torch.Tensor, r: int, precise: bool = True):
    """Rank-``r`` minimiser of ``‖(A − U Vᵀ) Lc‖_F`` with σ folded in.

    Returns ``(U (m, r), V (n, r), σ_all)`` where ``σ_all`` are all singular values of ``A·Lc``
    (so the loss is ``Σ_{i>r} σ_i²``). The back-substitution ``V = Lc⁻ᵀ Q`` runs in fp64 (``Lc`` can
    be ill-conditioned), the SVD in ``A``'s dtype, the product ``A·Lc`` in fp64 when ``precise``
    (else in ``A``'s dtype — for inner loops that repeat it many times).
    """
    if precise:
        B = (A.to(torch.float64) @ Lc.to(torch.float64)).to(A.dtype)
    else:
        B = A @ Lc.to(A.dtype)
    U, s, Q = truncated_svd(B, min(A.shape))
    Uf, Qf = fold(U[:, :r], s[:r], Q[:, :r])
    # Â = Uf Qfᵀ Lc⁻¹  ⇒  V = Lc⁻ᵀ Qf  (solve with the upper-triangular Lcᵀ)
    V = torch.linalg.solve_triangular(Lc.to(torch.float64).t(), Qf.to(torch.float64), upper=True)
    return Uf, V.to(A.dtype), s


def activation_error(E: torch.Tensor, H: torch.Tensor) -> float:
    """``sqrt(tr(E H Eᵀ))`` — the RMS output error ``‖E X‖_F/√N`` for ``H = XXᵀ/N``."""
    E64 = E.to(torch.float64)
    return float(((E64 @ H.to(torch.float64)) * E64).sum().clamp_min(0).sqrt())


def diag_weighted_error(E: torch.Tensor, sq: torch.Tensor) -> float:
    """``sqrt(Σ_ij E_ij² E[x_j²])`` — :func:`activation_error` with ``H`` replaced by its diagonal."""
    return float((E.to(torch.float64).pow(2) * sq.to(torch.float64).unsqueeze(0)).sum().sqrt())


def lowrank_plus_sparse(dtype: torch.dtype, S: torch.Tensor, mask: torch.Tensor, U: torch.Tensor | None, V: torch.Tensor | None,
                        info: dict):
    """``CompressedWeight`` of ``U Vᵀ + S`` in ``dtype``; a rank-0 result (``U`` empty or ``None``) is sparse only."""
    from capllm.methods.base import CompressedWeight

    if U is None or U.shape[1] == 0:
        return CompressedWeight(S=S.to(dtype), mask=mask, info=info)
    return CompressedWeight(S=S.to(dtype), mask=mask, U=U.to(dtype), V=V.to(dtype), info=info)

