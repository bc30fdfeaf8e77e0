"""Projection of keep-probabilities onto the cost-weighted budget set (CAP Stage 2, DESIGN §1).

The feasible set is ``{s : 0 ≤ s ≤ 1, Σ_k c_k s_k = K}``. Its Euclidean projection (KKT of
``min ‖s − s̃‖²`` with the multiplier ``v`` of the budget constraint) is

    s_k(v) = clip(s̃_k − v·c_k, 0, 1),

with the scalar ``v`` chosen so that ``Σ c_k s_k(v) = K``. ``f(v) = Σ c_k s_k(v)`` is continuous
and non-increasing in ``v``, so bisection finds ``v`` to machine precision; a negative ``v``
(raising probabilities) is used when the scores are under budget and ``fill=True``; with
``fill=False`` an under-budget ``s`` is only clipped (the paper's "skip when already under
budget").

All reductions are in float64 so that the budget is exact for tens of millions of candidates.
"""

from __future__ import annotations

import torch


def _spent(s: torch.Tensor, c: torch.Tensor, v: float, chunk: int = 1 << 24) -> float:
    total = 0.0
    for i in range(0, s.numel(), chunk):
        si, ci = s[i : i + chunk], c[i : i + chunk]
        total += float((ci * (si - v * ci).clamp_(0, 1)).sum(dtype=torch.float64))
    return total


def project_budget(s: torch.Tensor, c: torch.Tensor, budget: float, fill: bool = True, iters: int = 200) -> tuple[torch.Tensor, float]:
    """Return ``(projected s, v)``. ``s`` and ``c`` are 1-D, same length; ``c > 0``.

    ``budget`` must satisfy ``0 ≤ budget ≤ Σ c`` (raises ``ValueError`` otherwise).
    """
    if s.shape != c.shape or s.dim() != 1:
        raise ValueError("s and c must be 1-D and of the same length")
    total = float(c.sum(dtype=torch.float64))
    if budget < 0 or budget > total * (1 + 1e-12):
        raise ValueError(f"budget {budget:g} is outside [0, {total:g}]")
    if _spent(s, c, 0.0) <= budget and not fill:
        return s.clamp(0, 1), 0.0
    # bracket v: f(lo) >= budget >= f(hi)
    cmin = float(c.min())
    hi = max(float(s.max()), 0.0) / cmin + 1.0  # every s − v c ≤ 0
    lo = (min(float(s.min()), 1.0) - 1.0) / cmin - 1.0  # every s − v c ≥ 1
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if _spent(s, c, mid) > budget:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * max(1.0, abs(hi)):
            break
    v = hi  # the feasible side: spent ≤ budget
    return (s - v * c).clamp_(0, 1), v
