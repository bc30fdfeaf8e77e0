"""Initial scores of CAP Stage 2 (the paper leaves them open; DESIGN §1).

Importance of a candidate = the energy it contributes to its layer's output, to first order
(cross terms ignored):

* ``magnitude``:  direction ``σ_i²`` (= ‖σ_i u_i v_iᵀ‖_F²), entry ``S_ij²``;
* ``activation``: direction ``σ_i² · v_iᵀ C v_i``, entry ``S_ij² · C_jj``, with
  ``C = E[x xᵀ]`` the layer's input second moment (``E‖σ_i u_i v_iᵀ x‖² = σ_i² v_iᵀCv_i``) —
  the activation-aware scores ``σ_i‖V_iᵀX‖`` and ``|S_ij|‖X_j‖`` of the issue, squared;
* ``fisher``: the K-FAC second-order estimate of the increase of the *loss* when the
  candidate is removed, ``½ ΔWᵀ F ΔW`` with the layer's Fisher block ``F ≈ A ⊗ G``
  (``A = E[x xᵀ]``, ``G = diag E[g_i²]`` of the output gradients ``g = ∂ℒ/∂y``): direction
  ``½ σ_i² (u_iᵀ G u_i)(v_iᵀ A v_i)``, entry ``½ S_ij² A_jj G_ii``. In loss units, so it compares
  candidates *across* layers without normalisation, and ``G_ii`` balances output rows (what
  Wanda's per-row comparison does by construction);
* ``constant``: every candidate equally important.

``entry_score="obs"`` (our addition) values a sparse entry by what its removal costs when the
other weights of its row compensate, as the OBS refit then does: ``A_jj`` becomes
``1 / [A⁻¹]_jj`` (:func:`capllm.solvers.obs.obs_entry_gain`), so entry ``½ S_ij² G_ii / [A⁻¹]_jj``
(``fisher``), ``S_ij² / [A⁻¹]_jj`` (``activation``). The K-FAC form ``A_jj`` prices each removal as
if nothing moved, which over-prices inputs that others can stand in for — by a factor that
differs from layer to layer, which a global ranking then reads as importance.

``entry_score="diag"`` (our addition, ``fisher`` only) prices an entry by the exact diagonal of
the empirical Fisher, ``½ S_ij² E_t[g_ti² x_tj²]``, where K-FAC takes ``E[g_i²] E[x_j²]``: the two
differ where large inputs and large output gradients fall on different tokens (e.g. a massive
activation on the first token, whose gradient is small), which inflates ``A_jj`` for some
matrices and not others — a cross-matrix distortion a global ranking reads as importance.

``normalize="matrix"`` divides each matrix's importances by their sum, so every layer's scores
are fractions of its own output energy (otherwise layers with large activations dominate the
global ranking). The initial keep-probability is a soft knapsack on value per parameter:

    s_k = sigmoid( (log(imp_k / c_k) − τ) / T ),   τ by bisection so that Σ c_k s_k = K,

``T`` (``temperature``) sets how uncertain the policy starts: ``T → 0`` is the deterministic
greedy ranking, large ``T`` flattens towards the constant ``s = K / Σc``. ``constant`` starts at
exactly ``K / Σc`` (no information, the policy must find everything).
"""

from __future__ import annotations

import math

import torch

from capllm.allocate.pools import CandidatePools

SCORE_KINDS = ("fisher", "activation", "magnitude", "constant")


def reduce_gram(C: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v_iᵀ C v_i for every column of V, diag C)`` in float64 — all the scores need of ``C``.

    ``C`` is ``E[x xᵀ] (n, n)``, or only its diagonal ``E[x_j²] (n,)`` (then ``vᵀCv`` uses it alone).
    """
    C = C.double()
    V = V.double()
    if C.dim() == 2:
        return ((C @ V) * V).sum(0), C.diagonal()
    return (V**2 * C.unsqueeze(1)).sum(0), C


def matrix_importance(p, kind: str, vcv: torch.Tensor | None = None, adiag: torch.Tensor | None = None,
                      G: torch.Tensor | None = None, normalize: str = "matrix", entry_gain: torch.Tensor | None = None,
                      entry_fisher: torch.Tensor | None = None) -> torch.Tensor:
    """Importance (fp32, ≥ 0) of one :class:`~capllm.allocate.pools.MatrixPool`'s candidates.

    ``vcv = (v_iᵀ A v_i)_i`` and ``adiag = diag A`` come from :func:`reduce_gram` of the layer's
    input second moment ``A``; ``G = E[g²]`` of its output gradients (``fisher``). ``entry_gain``
    (``(n,)``, e.g. ``1 / [A⁻¹]_jj``) replaces ``diag A`` for the sparse entries (module docstring).
    ``entry_fisher`` (``(m, n)``, ``E_t[g_i² x_j²]``; ``fisher`` only) replaces ``G_ii A_jj`` for them.
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"unknown score kind {kind!r}")
    out = torch.empty(p.size, dtype=torch.float32)
    if kind == "constant":
        return out.fill_(1.0)
    sig2 = p.sigma.double() ** 2
    vals2 = p.entry_values().double() ** 2
    if kind in ("activation", "fisher"):
        if vcv is None or adiag is None:
            raise ValueError(f"activation scores need the input statistics of {p.name}")
        sig2 = sig2 * vcv.double().clamp_min(0)
        sup = p.support()
        exact = kind == "fisher" and entry_fisher is not None
        if not exact:
            vals2 = vals2 * (adiag if entry_gain is None else entry_gain).double()[sup % p.shape[1]]
        if kind == "fisher":
            if G is None:
                raise ValueError(f"fisher scores need the output-gradient statistics of {p.name}")
            G = G.double()
            sig2 = 0.5 * sig2 * ((p.U.double() ** 2) * G.unsqueeze(1)).sum(0)
            # K-FAC: ½ S_ij² E[g_i²] E[x_j²]; exact: the entry's own ½ S_ij² E[g_i² x_j²]
            vals2 = 0.5 * vals2 * (entry_fisher.reshape(-1).double()[sup] if exact else G[sup // p.shape[1]])
    out[: p.rank] = sig2.float()
    out[p.rank :] = vals2.float()
    if normalize == "matrix":
        total = float(sig2.sum() + vals2.sum())
        if total > 0:
            out /= total
    elif normalize != "none":
        raise ValueError(f"unknown normalisation {normalize!r}")
    return out


def matrix_costs(p) -> torch.Tensor:
    """Cost (fp32) of each of one matrix's candidates: ``m + n`` per direction, 1 per entry."""
    c = torch.ones(p.size, dtype=torch.float32)
    c[: p.rank] = p.direction_cost
    return c


def importances(pools: CandidatePools, kind: str, grams: dict[str, torch.Tensor] | None = None, normalize: str = "matrix",
                out_grad_sq: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-candidate importance (fp32, ≥ 0), in pool order (small models; CAP itself scores one
    matrix at a time with :func:`matrix_importance`)."""
    if kind not in SCORE_KINDS:
        raise ValueError(f"unknown score kind {kind!r}")
    out = torch.empty(pools.size, dtype=torch.float32)
    for p in pools.matrices:
        vcv = adiag = G = None
        if kind in ("activation", "fisher"):
            if grams is None or p.name not in grams:
                raise ValueError(f"activation scores need the input statistics of {p.name}")
            vcv, adiag = reduce_gram(grams[p.name], p.V)
        if kind == "fisher":
            if out_grad_sq is None or p.name not in out_grad_sq:
                raise ValueError(f"fisher scores need the output-gradient statistics of {p.name}")
            G = out_grad_sq[p.name]
        out[p.offset : p.offset + p.size] = matrix_importance(p, kind, vcv, adiag, G, normalize)
    return out


def soft_knapsack(value_per_cost: torch.Tensor, cost: torch.Tensor, budget: float, temperature: float, iters: int = 48) -> torch.Tensor:
    """``sigmoid((log v − τ)/T)`` with ``τ`` chosen so that ``Σ c s = budget``."""
    logv = torch.log(value_per_cost.double().clamp_min(1e-300)).float()
    logv[value_per_cost <= 0] = -math.inf
    finite = logv[torch.isfinite(logv)]
    if finite.numel() == 0:
        raise ValueError("every candidate has zero importance")
    lo, hi = float(finite.min()) - 50 * temperature, float(finite.max()) + 50 * temperature

    def spent(tau: float) -> float:
        return float((cost * torch.sigmoid((logv - tau) / temperature)).sum(dtype=torch.float64))

    for _ in range(iters):  # spent(τ) decreases with τ
        mid = 0.5 * (lo + hi)
        if spent(mid) > budget:
            lo = mid
        else:
            hi = mid
    return torch.sigmoid((logv - hi) / temperature)


def value_per_cost(pools: CandidatePools, cost: torch.Tensor, kind: str, grams=None, normalize: str = "matrix", out_grad_sq=None) -> torch.Tensor:
    """The ranking key: importance per parameter."""
    return importances(pools, kind, grams, normalize, out_grad_sq) / cost


def initial_probabilities(pools: CandidatePools, cost: torch.Tensor, budget: float, kind: str, grams=None, normalize: str = "matrix", temperature: float = 0.5,
                          out_grad_sq=None, vpc: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s0, value_per_cost)``: the starting keep-probabilities and the ranking key behind them."""
    if vpc is None:
        vpc = value_per_cost(pools, cost, kind, grams, normalize, out_grad_sq)
    if kind == "constant":
        return torch.full_like(cost, budget / float(cost.sum(dtype=torch.float64))), vpc
    return soft_knapsack(vpc, cost, budget, temperature), vpc
