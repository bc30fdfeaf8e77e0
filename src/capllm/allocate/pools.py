"""Candidate pools of CAP Stage 2: every singular direction and every sparse entry of the model.

Stage 1 writes each matrix as ``W = U diag(σ) Vᵀ + S``. Stage 2 chooses, across all matrices at
once, which of these survive:

* direction ``i`` of matrix ``k`` (shape ``m × n``) costs ``m + n`` parameters (σ folded into
  the factors, ``U' = U√σ``, ``V' = V√σ``);
* each non-zero ``S_ij`` costs 1 parameter (its index overhead is reported by the storage
  format, never hidden in the budget).

Layout: one flat candidate vector; matrix ``k`` owns the contiguous segment
``[offset_k, offset_k + r_k + nnz_k)`` — its ``r_k`` directions (in σ order) then its ``nnz_k``
entries (in row-major order of ``S``'s support). The index back to (matrix, position) is
implicit in that layout, so the pool stores no per-candidate index: ``S`` is kept dense per
matrix and its support is recomputed when a mask is applied. Memory per candidate: the policy's
``s`` and the cost (fp32) — about 8 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MatrixPool:
    name: str
    shape: tuple[int, int]
    U: torch.Tensor  # (m, r)
    sigma: torch.Tensor  # (r,)
    V: torch.Tensor  # (n, r)
    S: torch.Tensor  # (m, n), zeros off the support
    offset: int = 0

    @property
    def rank(self) -> int:
        return self.sigma.numel()

    @property
    def nnz(self) -> int:
        return self._nnz

    @property
    def direction_cost(self) -> int:
        return self.shape[0] + self.shape[1]

    @property
    def size(self) -> int:
        """Number of candidates (directions + entries)."""
        return self.rank + self._nnz

    def __post_init__(self) -> None:
        self._nnz = int((self.S != 0).sum())

    def support(self) -> torch.Tensor:
        """Flat (row-major) positions of ``S``'s non-zeros, in candidate order."""
        return torch.nonzero(self.S.reshape(-1) != 0).squeeze(1)

    def entry_values(self) -> torch.Tensor:
        flat = self.S.reshape(-1)
        return flat[flat != 0]

    def compose(self, keep: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(U', V', S_kept)`` for a boolean keep-mask over this matrix's candidates."""
        r = self.rank
        kd, ke = keep[:r], keep[r:]
        U = V = None
        if bool(kd.any()):
            root = self.sigma[kd].sqrt()
            U = self.U[:, kd] * root
            V = self.V[:, kd] * root
        S = None
        if bool(ke.any()):
            flat = torch.zeros(self.S.numel(), dtype=self.S.dtype, device=self.S.device)
            idx = self.support()[ke]
            flat[idx] = self.S.reshape(-1)[idx]
            S = flat.view_as(self.S)
        return U, V, S

    def restricted(self, allowed: torch.Tensor) -> "MatrixPool":
        """The same pool with ``S`` kept only where ``allowed (m, n)`` is true (fewer entry candidates)."""
        return MatrixPool(self.name, self.shape, self.U, self.sigma, self.V, self.S * allowed.to(self.S.dtype))

    def dense(self, keep: torch.Tensor) -> torch.Tensor:
        """``W̃ = U diag(σ ⊙ m_σ) Vᵀ + S ⊙ m_S`` as a dense matrix."""
        r = self.rank
        kd, ke = keep[:r].to(self.sigma.dtype), keep[r:]
        W = (self.U * (self.sigma * kd)) @ self.V.t()
        flat = W.reshape(-1)
        idx = self.support()
        flat[idx] += self.S.reshape(-1)[idx] * ke.to(self.S.dtype)
        return W


def nm_candidates(S: torch.Tensor, input_energy: torch.Tensor | None, n: int, m: int) -> torch.Tensor:
    """The entries of ``S (rows, cols)`` an ``n:m`` pattern may keep: in every group of ``m``
    consecutive inputs of a row, the ``n`` with the largest ``S_ij² · A_jj`` (``A_jj = E[x_j²]``,
    ``input_energy``; all ones if ``None``), ties to the earlier column; a last partial group keeps
    ``min(n, its width)``. Within a row the K-FAC key of an entry, ``½ S_ij² A_jj G_ii``, orders the
    entries the same way (``G_ii`` is the row's), so these are the ``n`` of each group CAP's ranking
    would reach first — restricting the pool to them makes every allocation built from it ``n:m``.
    Bool mask, shape of ``S``."""
    rows, cols = S.shape
    score = S.double().square()
    if input_energy is not None:
        score = score * input_energy.double().clamp_min(0).reshape(1, cols)
    pad = (-cols) % m
    if pad:  # a partial last group: its padding never wins a place
        score = torch.cat([score, score.new_full((rows, pad), -1.0)], 1)
    groups = score.reshape(rows, -1, m)
    top = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True).reshape(rows, cols + pad)
    return mask[:, :cols]


class CandidatePools:
    """All matrices' candidates as one flat vector (see the module docstring)."""

    def __init__(self, matrices: list[MatrixPool]) -> None:
        self.matrices = matrices
        off = 0
        for p in matrices:
            p.offset = off
            off += p.size
        self.size = off

    def segment(self, k: int) -> slice:
        p = self.matrices[k]
        return slice(p.offset, p.offset + p.size)

    def costs(self, dtype=torch.float32) -> torch.Tensor:
        c = torch.ones(self.size, dtype=dtype)
        for p in self.matrices:
            c[p.offset : p.offset + p.rank] = p.direction_cost
        return c

    def matrix_index(self) -> torch.Tensor:
        """``int32`` matrix id of every candidate."""
        ids = torch.empty(self.size, dtype=torch.int32)
        for k, p in enumerate(self.matrices):
            ids[p.offset : p.offset + p.size] = k
        return ids

    def is_direction(self) -> torch.Tensor:
        d = torch.zeros(self.size, dtype=torch.bool)
        for p in self.matrices:
            d[p.offset : p.offset + p.rank] = True
        return d

    @property
    def dense_params(self) -> int:
        return sum(p.shape[0] * p.shape[1] for p in self.matrices)

    @property
    def pool_cost(self) -> int:
        return sum(p.rank * p.direction_cost + p.size - p.rank for p in self.matrices)

    def kept_cost(self, keep: torch.Tensor) -> int:
        total = 0
        for p in self.matrices:
            seg = keep[p.offset : p.offset + p.size]
            total += int(seg[: p.rank].sum()) * p.direction_cost + int(seg[p.rank :].sum())
        return total

    def describe(self) -> dict:
        return {
            "matrices": len(self.matrices),
            "directions": sum(p.rank for p in self.matrices),
            "sparse_entries": sum(p.size - p.rank for p in self.matrices),
            "pool_cost": self.pool_cost,
            "pool_cost_over_dense": round(self.pool_cost / self.dense_params, 4),
        }
