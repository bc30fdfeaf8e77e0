"""Exact reconstruction of a matrix on a fixed support: ``min ‖(Ŵ − R) X‖_F²`` over ``Ŵ`` with
``Ŵ_ij = 0`` off the support, by batched preconditioned conjugate gradients.

With ``H = E[x xᵀ]`` (damped as the OBS solve damps it, ``H + δI``, ``δ = percdamp × mean diag H``)
the objective separates by rows: row ``i`` with support ``S_i`` solves

    H_{S_i S_i} ŵ_{S_i} = (H r_i)_{S_i},

a different ``|S_i| × |S_i|`` system per row. SparseGPT's sequential OBS pass
(:func:`capllm.solvers.obs.sparsegpt_prune` with the mask fixed) freezes each column once it is
processed, so earlier kept weights never compensate for later removals: it is an approximation of
this optimum (the "optimal weight update" observation of Boža 2024, arXiv 2401.16052, solved
there by ADMM). Here all rows run one CG together: the operator is ``A(P) = (P H) ⊙ M``, one
``m × n × n`` product per iteration, with a Jacobi preconditioner ``1 / H_jj`` (activation
outliers make ``diag H`` span orders of magnitude) and per-row step sizes. Started from the OBS
solution, the objective of every row decreases monotonically (CG minimises the energy norm of the
error in the Krylov space); ``iters`` bounds the work. Dead inputs (``H_jj = 0``) stay zero.
"""

from __future__ import annotations

import torch

from capllm.solvers.obs import damped


def support_objective(W: torch.Tensor, R: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per-row ``(w_i − r_i) H (w_i − r_i)ᵀ`` (float64, ``(m,)``)."""
    D = (W - R).double()
    return ((D @ H.double()) * D).sum(1)


def refine_on_support(W0: torch.Tensor, R: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, iters: int,
                      percdamp: float = 0.01, tol: float = 1e-10) -> torch.Tensor:
    """Improve ``W0`` (zero off ``mask``) towards ``argmin_{Ŵ ⊙ ¬mask = 0} ‖(Ŵ − R) X‖²`` with at most
    ``iters`` CG steps (module docstring); returns a new float32 matrix, zero off the support.
    Rows stop once their preconditioned residual falls below ``tol`` × its start."""
    W = (W0.float() * mask).contiguous()
    if iters <= 0 or not bool(mask.any()):
        return W
    M = mask.to(torch.float32)
    H, dead = damped(H, percdamp)
    M[:, dead] = 0
    W *= M
    Rt = R.float().clone()
    Rt[:, dead] = 0
    inv_diag = 1.0 / H.diagonal()
    r = ((Rt - W) @ H) * M  # residual of the normal equations, masked
    z = r * inv_diag
    p = z.clone()
    rz = (r * z).sum(1, dtype=torch.float64)
    stop = rz * tol
    for _ in range(iters):
        active = rz > stop
        if not bool(active.any()):
            break
        Ap = (p @ H) * M
        pAp = (p * Ap).sum(1, dtype=torch.float64)
        alpha = torch.where(active & (pAp > 0), rz / pAp.clamp_min(1e-300), torch.zeros_like(rz)).float().unsqueeze(1)
        W += alpha * p
        r -= alpha * Ap
        z = r * inv_diag
        rz_new = (r * z).sum(1, dtype=torch.float64)
        beta = torch.where(active, rz_new / rz.clamp_min(1e-300), torch.zeros_like(rz)).float().unsqueeze(1)
        p = z + beta * p
        rz = torch.where(active, rz_new, rz)
    return W * M
