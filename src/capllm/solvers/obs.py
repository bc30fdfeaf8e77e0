"""The OBS solve behind SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774): prune a matrix
to a sparsity (or to a given support) and reconstruct the kept weights from the input second moment.

It knows no method: :mod:`capllm.methods.sparsegpt` calls it to choose a support, CAP's refit
(:mod:`capllm.allocate.refit`) to re-solve the values on a support already chosen.

With ``H = 2XXᵀ/N`` (here ``E[x xᵀ]``; the factor cancels), damped by ``percdamp`` × mean
diagonal, and ``Hinv = chol(H⁻¹)ᵀ`` (upper Cholesky factor of the inverse), columns are
processed left to right in blocks of ``blocksize``. Inside each block the mask keeps the
entries with the largest ``w²/[Hinv]_jj²``, exactly ``⌊ρ·m·B⌋`` pruned per block (unstructured)
or ``M − N`` per group of ``M`` (``N:M``, chosen when the group is reached). Every pruned weight's
error ``(w − q)/[Hinv]_jj`` is propagated to the later columns:
``W[:, j:] −= err · Hinv[j, j:]`` — the OBS update. Columns with ``H_jj = 0`` (dead inputs) are
zeroed first, as in the reference.

Deviation from the reference, on purpose: the reference thresholds at the ``⌊ρ·numel⌋``-th
sorted score with ``<=`` (ties prune one extra); we prune exactly ``⌊ρ·numel⌋`` per block.
"""

from __future__ import annotations

import torch

from capllm.errors import CapllmError


def damped(H: torch.Tensor, percdamp: float, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H + δ·scale·I, dead)`` as a new float32 matrix: dead inputs (``H_jj = 0``) set to 1 first,
    ``δ = percdamp × mean diag H`` (SparseGPT's damping)."""
    H = H.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    H.diagonal().add_(percdamp * H.diagonal().mean() * scale)
    return H, dead


def damped_cholesky(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(L, dead, attempt)``: the lower Cholesky factor of :func:`damped` ``H`` at damping
    ``δ·10^attempt``, with the smallest ``attempt ≤ 5`` that makes it positive definite."""
    for attempt in range(6):
        Hd, dead = damped(H, percdamp, 10.0**attempt)
        L, bad = torch.linalg.cholesky_ex(Hd)
        if bad == 0:
            return L, dead, attempt
    raise CapllmError("SparseGPT: the Hessian is not positive definite even with 1e5× damping; the calibration inputs are degenerate")


def obs_entry_gain(H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """``1 / [H⁻¹]_jj`` (float32, ``(n,)``) of the damped ``H = E[x xᵀ]``; 0 for dead inputs.

    The OBS cost of removing one weight ``w_ij`` while every other weight of row ``i`` moves to
    compensate (LeCun et al. 1990; Hassibi & Stork 1993) is ``½ w_ij² / [H⁻¹]_jj`` on the row's
    output error ``E[(Δw_i x)²]`` — against ``½ w_ij² H_jj`` when nothing compensates. Since
    ``[H⁻¹]_jj ≥ 1 / H_jj``, the gain is ``≤ H_jj``, equal for an input uncorrelated with the others:
    an input the others can stand in for costs little to drop. This is the value CAP's OBS refit
    realises on the support it is given (one removal at a time, cross terms ignored)."""
    L, dead, _ = damped_cholesky(H, percdamp)
    gain = 1.0 / torch.cholesky_inverse(L).diagonal()
    gain[dead] = 0
    return gain


def sparsegpt_prune(weight: torch.Tensor, H: torch.Tensor, ratio: float, structure=None, blocksize: int = 128, percdamp: float = 0.01,
                    keep_mask: torch.Tensor | None = None, reselect: bool = False):
    """Return ``(pruned W, keep mask, info)``; ``H`` is ``E[x xᵀ]`` (n × n).

    ``structure`` is ``None`` (unstructured, ``ratio`` of each block pruned) or an N:M pattern,
    anything with integer ``n`` (kept) and ``m`` (group size) such as :class:`capllm.methods.base.Structure`.

    ``keep_mask`` fixes the support instead of choosing it (``ratio`` and ``structure`` are then
    ignored): the OBS updates reconstruct the kept weights for that given mask — CAP's refit.
    With ``reselect`` the mask fixes only *how many* entries each block of ``blocksize`` columns
    keeps; which ones is chosen as in the unstructured prune, by ``w²/[Hinv]_jj²`` on the weights
    as the updates of the earlier blocks left them (CAP's ``refit=reselect``). The kept count of
    the matrix, and of each column block, is that of ``keep_mask``. With ``reselect`` and an N:M
    ``structure`` the count is fixed per row and group of ``m`` columns instead (each ``≤ n`` when
    ``keep_mask`` is N:M), and the group's survivors are chosen when the group is reached, as in
    the N:M prune — so the result is N:M with ``keep_mask``'s count in every group.
    """
    if reselect and keep_mask is None:
        raise CapllmError("sparsegpt_prune: reselect needs a keep_mask (the counts to keep)")
    if reselect and structure is not None and (blocksize % structure.m or weight.shape[1] % structure.m):
        raise CapllmError(f"sparsegpt_prune: N:M reselect needs the block size and the {weight.shape[1]} inputs to be multiples of M={structure.m}")
    W = weight.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    m, n = W.shape
    L, dead, attempt = damped_cholesky(H, percdamp)
    W[:, dead] = 0
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)

    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        prune1 = torch.zeros_like(W1, dtype=torch.bool)
        if keep_mask is not None and not reselect:
            prune1 = ~keep_mask[:, i1:i2].to(W.device)
        elif structure is None:  # (with reselect and a structure, the groups choose below)
            score = (W1**2 / d1.unsqueeze(0) ** 2).reshape(-1)
            k = int((~keep_mask[:, i1:i2]).sum()) if reselect else int(score.numel() * ratio)
            if k:
                prune1.view(-1)[torch.topk(score, k, largest=False, sorted=False).indices] = True
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if structure is not None and i % structure.m == 0 and (keep_mask is None or reselect):
                g = W1[:, i : i + structure.m] ** 2 / d1[i : i + structure.m].unsqueeze(0) ** 2
                if keep_mask is None:
                    prune1.scatter_(1, i + torch.topk(g, structure.m - structure.n, dim=1, largest=False).indices, True)
                else:  # each row keeps its count of this group: the best by saliency, ties to the earlier column
                    k = keep_mask[:, i1 + i : i1 + i + structure.m].sum(1, keepdim=True).to(W.device)
                    order = torch.sort(g, dim=1, descending=True, stable=True).indices
                    place = torch.empty_like(order).scatter_(1, order, torch.arange(structure.m, device=W.device).expand_as(order).contiguous())
                    prune1[:, i : i + structure.m] = place >= k
            q = w.clone()
            q[prune1[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = ~prune1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, keep, {"damping_scale": 10**attempt}
