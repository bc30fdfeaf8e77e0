"""The Bernoulli policy of CAP Stage 2, trained with REINFORCE (arXiv 2505.03801 §3.2, DESIGN §1).

Each unit ``k`` (a candidate, or a group of candidates) is kept with probability ``s_k``;
``m ~ Bern(s)``. For the expected loss ``E_m[ℒ(m)]`` the score-function estimator is

    ĝ_k = (ℒ(m) − b) · (m_k − s_k) / (s_k (1 − s_k) + ε),

unbiased for any baseline ``b`` that does not depend on ``m``. Baselines:

* ``moving`` (the paper): ``δ ← β δ + (1 − β) ℒ`` over the losses seen (window 5 ⇒ β = 0.8),
  started at the mean of the first step's losses;
* ``loo``: leave-one-out — each sample's baseline is the mean loss of the *other* samples of the
  same step (unbiased, and usually lower variance with several samples per step).

``antithetic=True`` draws samples in pairs from ``u`` and ``1 − u`` (negatively correlated masks).
After each step ``s ← Proj(s − η ĝ)`` onto ``{0 ≤ s ≤ 1, Σ c s = K}``
(:func:`capllm.allocate.projection.project_budget`). The per-unit variance of the estimator is
measured from the per-sample terms and reported, so a run says how noisy its gradient was.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from capllm.allocate.projection import project_budget


@dataclass(frozen=True)
class PolicyConfig:
    steps: int = 3  # paper: 3 policy-gradient iterations
    samples: int = 4  # masks per step
    lr: float = 0.05  # paper
    baseline: str = "moving"  # moving | loo
    beta: float = 0.8  # moving-average window 5
    antithetic: bool = False
    eps: float = 1e-6
    seed: int = 0


@dataclass
class PolicyResult:
    s: torch.Tensor
    curve: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"curve": self.curve}


def reinforce_gradient(losses: list[float], masks: list[torch.Tensor], s: torch.Tensor, baselines: list[float], eps: float) -> tuple[torch.Tensor, dict]:
    """Mean of the per-sample score-function terms, and their variance statistics."""
    denom = s * (1 - s) + eps
    mean = torch.zeros_like(s)
    sq = torch.zeros_like(s)
    for L, m, b in zip(losses, masks, baselines):
        g = (L - b) * (m.to(s.dtype) - s) / denom
        mean += g
        sq += g * g
    n = len(losses)
    mean /= n
    stats = {}
    if n > 1:
        var = (sq / n - mean * mean).clamp_min(0) * n / (n - 1)  # per-unit sample variance of one term
        se2 = var / n  # variance of the mean estimate
        stats = {
            "grad_norm": float(mean.norm()),
            "grad_var_mean": float(var.mean()),
            "grad_se_norm": float(se2.sum().sqrt()),
            # signal-to-noise of the step: ‖ĝ‖ / sqrt(Σ Var[ĝ_k]) — below ~1 the step is mostly noise
            "snr": float(mean.norm() / se2.sum().sqrt().clamp_min(1e-30)),
        }
    return mean, stats


def sample_masks(s: torch.Tensor, n: int, gen: torch.Generator, antithetic: bool) -> list[torch.Tensor]:
    masks = []
    while len(masks) < n:
        u = torch.rand(s.shape, generator=gen)
        masks.append(u < s)
        if antithetic and len(masks) < n:
            masks.append((1 - u) < s)
    return masks


def run_policy(s0: torch.Tensor, cost: torch.Tensor, budget: float, loss_fn: Callable[[torch.Tensor], float], cfg: PolicyConfig = PolicyConfig(), progress: bool = True) -> PolicyResult:
    """Train the keep-probabilities for ``cfg.steps`` steps; ``loss_fn(mask) -> float``."""
    s = s0.clone()
    gen = torch.Generator().manual_seed(cfg.seed)
    delta = None
    curve = []
    bar = tqdm(total=cfg.steps * cfg.samples, desc="CAP stage 2: policy", disable=not progress, unit="mask")
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        masks = sample_masks(s, cfg.samples, gen, cfg.antithetic)
        losses = []
        for m in masks:
            losses.append(float(loss_fn(m)))
            bar.update(1)
        if not all(math.isfinite(x) for x in losses):
            raise RuntimeError(f"non-finite policy loss at step {step}: {losses}")
        if cfg.baseline == "loo" and len(losses) > 1:
            tot = sum(losses)
            baselines = [(tot - L) / (len(losses) - 1) for L in losses]
        else:
            if delta is None:
                delta = sum(losses) / len(losses)
            baselines = [delta] * len(losses)
        grad, stats = reinforce_gradient(losses, masks, s, baselines, cfg.eps)
        if cfg.baseline != "loo" or len(losses) == 1:
            for L in losses:
                delta = cfg.beta * delta + (1 - cfg.beta) * L
        s_before = s
        s, v = project_budget(s - cfg.lr * grad, cost, budget)
        curve.append({
            "step": step + 1, "losses": [round(x, 6) for x in losses], "mean_loss": sum(losses) / len(losses),
            "baseline": delta if cfg.baseline != "loo" else None, "shift_v": v,
            "mean_abs_change": float((s - s_before).abs().mean()), "seconds": round(time.perf_counter() - t0, 2), **stats,
        })
    bar.close()
    return PolicyResult(s, curve)
