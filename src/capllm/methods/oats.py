"""``oats``: outlier-aware alternating low-rank + sparse decomposition (Zhang & Papyan 2025, arXiv 2409.13652).

With ``D = diag(√E[x_j²])`` (the Wanda input norm) OATS decomposes the scaled weight ``A = W·D``:

    S ← 0
    repeat T times:
        L ← rank-r truncated SVD of (A − S)
        S ← hard-threshold(A − L): keep the largest |entries| of each row (or N:M groups)
    W ≈ (L + S)·D⁻¹         stored as U = U_r√σ, V = D⁻¹ V_r√σ, S ← S·D⁻¹

T = 80 iterations by default (the reference's setting). The last iterate is returned (``L`` then
``S`` of the same iteration, as in the reference).

**Budget** (``B = ⌊(1 − ρ)mn⌋`` per matrix): rank ``r = ⌊κ·B/(m + n)⌋`` with ``κ`` = ``rank_ratio``
(default 0.3; the reference's ``⌊κ(1 − ρ)mn/(m + n)⌋`` up to the rounding of ``B``); the sparse part
keeps exactly ``B − r(m + n)`` entries, ``⌊·/m⌋`` per row plus one more in the rows whose next-best
entry is largest — so the kept count equals ``B`` exactly. (The reference keeps
``n − ⌊n(1 − (1 − κ)(1 − ρ))⌋`` per row, which can miss ``B`` by up to ``m`` entries.)
With ``κ = 0`` OATS is exactly Wanda's per-row mask.

**N:M** (``--structure``): the sparse part keeps ``N`` of every ``M`` consecutive inputs
(``(N/M)·mn`` entries) and the low-rank part takes the rest of the budget,
``r = ⌊(B − (N/M)mn)/(m + n)⌋`` (κ is then implied, not an input); so ``--ratio`` must be at most
the structure's ``1 − N/M``. The reference instead fixes κ and lets the total follow
(``dense share = (N/M)/(1 − κ)``).

**SVD** (option ``svd``): ``full`` — a LAPACK SVD every iteration, as the reference;
``warm`` — one block power step warm-started from the previous iteration's right singular
vectors (``r + 16`` of them, Rayleigh–Ritz; the first iteration is a full SVD), several times
faster; its agreement with ``full`` is measured in ``benchmarks/baselines.md``.

Dead inputs (``E[x_j²] = 0``) get ``D_jj = 10⁻⁶·max D`` so the un-scaling is finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from capllm.errors import CapllmError
from capllm.methods.base import CompressedWeight, Method, StatsCompressor, Structure, matrix_budget, register
from capllm.methods.lowrank import fold, lowrank_plus_sparse, rank_at_budget, subspace_svd, truncated_svd
from capllm.methods.masks import keep_nm, keep_per_row_filled


def input_scale(sq: torch.Tensor) -> torch.Tensor:
    """``√E[x_j²]`` with dead inputs lifted to ``10⁻⁶·max`` (all ones if every input is dead)."""
    d = sq.double().clamp_min(0).sqrt()
    top = float(d.max()) if d.numel() else 0.0
    if top <= 0:
        return torch.ones_like(d, dtype=torch.float32)
    return d.clamp_min(1e-6 * top).float()


def oats_budget(m: int, n: int, ratio: float, rank_ratio: float, structure: Structure | None) -> tuple[int, int]:
    """``(rank, sparse entries)`` for one matrix (N:M: the sparse count is fixed by the pattern)."""
    B = matrix_budget(m, n, ratio)
    if structure is not None:
        nnz = m * (n // structure.m) * structure.n
        return rank_at_budget(m, n, B - nnz), nnz
    r = rank_at_budget(m, n, rank_ratio * B)
    return r, B - r * (m + n)


def oats_decompose(A: torch.Tensor, r: int, keep: int, iters: int, structure: Structure | None = None,
                   svd: str = "full", oversample: int = 16):
    """Alternate rank-``r`` SVD and per-row hard thresholding on ``A``; see the module docstring.

    Returns ``(U, σ, V, S, mask, errors)`` with ``errors[t] = ‖A − L_t − S_t‖_F`` after iteration t.
    """
    m, n = A.shape
    S = torch.zeros_like(A)
    U, s, V = A.new_zeros(m, 0), A.new_zeros(0), A.new_zeros(n, 0)
    basis = None
    errors = []
    for t in range(iters if r > 0 else 1):
        if r > 0:
            X = A - S
            if svd == "warm" and basis is not None:
                U, s, V, basis = subspace_svd(X, basis, r)
            elif svd == "warm":
                k = min(r + oversample, m, n)
                U, s, V = truncated_svd(X, k)
                basis = V
                U, s, V = U[:, :r], s[:r], V[:, :r]
            else:
                U, s, V = truncated_svd(X, r)
            R = A - (U * s) @ V.t()
        else:
            R = A
        score = R.abs()
        mask = keep_nm(score, structure) if structure is not None else keep_per_row_filled(score, keep)
        S = R * mask
        errors.append(float(torch.linalg.vector_norm(R.masked_fill(mask, 0))))
    return U, s, V, S, mask, errors


class _OATSCompressor(StatsCompressor):
    STATS = {"sq": True}

    def compress(self, weight: torch.Tensor) -> CompressedWeight:
        o, meth = self.method.options, self.method
        m, n = weight.shape
        r, keep = oats_budget(m, n, meth.ratio, o.rank_ratio, meth.structure)
        d = input_scale(self.stats.sq).to(weight.device)
        A = weight.float() * d.unsqueeze(0)
        U, s, V, S, mask, errors = oats_decompose(A, r, keep, o.iters, meth.structure, o.svd)
        norm = max(float(torch.linalg.vector_norm(A)), 1e-30)
        info = {"iters": len(errors), "scaled_rel_error_first": round(errors[0] / norm, 6),
                "scaled_rel_error": round(errors[-1] / norm, 6)}
        S = S / d.unsqueeze(0)
        if r == 0:
            return lowrank_plus_sparse(weight.dtype, S, mask, None, None, info)
        Uf, Vf = fold(U, s, V)
        return lowrank_plus_sparse(weight.dtype, S, mask, Uf, Vf / d.unsqueeze(1), info)


@register
class OATS(Method):
    name = "oats"
    description = "alternating rank-r SVD / per-row hard threshold of W·diag(√E x²) (Zhang & Papyan 2025)"
    supports_structure = True

    @dataclass(frozen=True)
    class Options:
        rank_ratio: float = 0.3
        iters: int = 80
        svd: str = "full"

    def __init__(self, ratio: float, structure: Structure | None = None, options: dict | None = None) -> None:
        super().__init__(ratio, None, options)
        o = self.options
        if not 0.0 <= o.rank_ratio < 1.0:
            raise CapllmError(f"oats: rank_ratio={o.rank_ratio} must be in [0, 1) (the low-rank share of each matrix's budget)")
        if o.iters < 1:
            raise CapllmError(f"oats: iters={o.iters} must be at least 1")
        if o.svd not in ("full", "warm"):
            raise CapllmError(f"oats: svd={o.svd!r} must be 'full' or 'warm'")
        if structure is not None and ratio > structure.ratio + 1e-9:
            raise CapllmError(f"oats with {structure}: the sparse part alone keeps {structure.n}/{structure.m} of each matrix, "
                              f"so --ratio must be at most {structure.ratio:g} (the low-rank part fills the rest of the budget)")
        self.structure = structure

    def layer_compressor(self, handle):
        return _OATSCompressor(handle.shape[1], handle.module.weight.device, self)
