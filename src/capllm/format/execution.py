"""Which kernel runs ``S x``: dense or CSR, chosen per layer at load time, and recorded.

Policy ``auto`` (the default):

1. density ``nnz / (m·n)`` above :data:`AUTO_CSR_MAX_DENSITY` (10 %) → **dense**, no probe. On
   the 2-core CPU here torch's CSR × dense product (MKL) was 2.5–4× *slower* than the dense
   GEMM at 50 % density and roughly even at 10–30 %, for 1 and 512 tokens
   (benchmarks/format.md); int32 CSR also needs ``nnz · (itemsize + 4)`` bytes, so it saves no
   memory over dense fp32 above 50 % density.
2. otherwise a timing probe on the target device: the median of 5 runs of each path on
   ``PROBE_TOKENS`` random tokens; CSR is chosen only when it is at least 10 % faster. Results
   are cached per (device, shape, density to 1 %, dtype) so identical layers probe once.

Policies ``dense`` and ``csr`` force one path everywhere (for measurements). Every choice is
kept on the module (``LowRankSparseLinear.decision``, or ``capllm_decision`` on a plain
``nn.Linear``/``Conv1D`` that the dense fallback restores), and :func:`describe_execution` lists
them.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from capllm.errors import CapllmError
from capllm.format.modules import LowRankSparseLinear, to_csr

POLICIES = ("auto", "dense", "csr")
AUTO_CSR_MAX_DENSITY = 0.10
PROBE_TOKENS = 16
PROBE_REPEATS = 5
CSR_MARGIN = 0.9  # CSR must take < 90 % of the dense time

_probe_cache: dict[tuple, dict[str, Any]] = {}


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise CapllmError(f"unknown execution policy {policy!r}: use one of {', '.join(POLICIES)}")
    return policy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device: torch.device) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(PROBE_REPEATS):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def probe(S: torch.Tensor, tokens: int = PROBE_TOKENS) -> dict[str, Any]:
    """Time ``S x`` dense and CSR on ``S``'s device for ``tokens`` random inputs."""
    dev = S.device
    x = torch.randn(tokens, S.shape[1], dtype=S.dtype, device=dev)
    out: dict[str, Any] = {"probe_tokens": tokens}
    with torch.inference_mode():
        out["dense_ms"] = round(_median_ms(lambda: F.linear(x, S), dev), 4)
        try:
            C = to_csr(S)
            out["csr_ms"] = round(_median_ms(lambda: C @ x.t(), dev), 4)
        except (RuntimeError, NotImplementedError) as exc:  # e.g. no CSR kernel for bf16 on CPU
            out["csr_ms"] = None
            out["csr_error"] = str(exc).splitlines()[0][:120]
    return out


def choose_layout(S: torch.Tensor, policy: str = "auto") -> tuple[str, dict[str, Any]]:
    """``("dense" | "csr", decision)`` for the dense matrix ``S`` on its target device."""
    m, n = S.shape
    nnz = int((S != 0).sum())
    density = nnz / (m * n)
    decision: dict[str, Any] = {"policy": policy, "density": round(density, 6), "device": str(S.device)}
    if policy in ("dense", "csr"):
        return policy, {**decision, "reason": f"forced by policy {policy}"}
    if density > AUTO_CSR_MAX_DENSITY:
        return "dense", {**decision, "reason": f"density {density:.3f} > {AUTO_CSR_MAX_DENSITY}: CSR does not pay"}
    key = (str(S.device), m, n, round(density, 2), S.dtype)
    if key not in _probe_cache:
        _probe_cache[key] = probe(S)
    timing = _probe_cache[key]
    csr_ok = timing["csr_ms"] is not None and timing["csr_ms"] < CSR_MARGIN * timing["dense_ms"]
    layout = "csr" if csr_ok else "dense"
    return layout, {**decision, **timing, "reason": f"probe: csr {timing['csr_ms']} ms vs dense {timing['dense_ms']} ms"}


def describe_execution(model: nn.Module) -> dict[str, Any]:
    """Which path each compressed layer of ``model`` runs, why, and a count per path."""
    rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, LowRankSparseLinear):
            rows.append({"name": name, "path": mod.execution, "rank": mod.rank, "nnz": mod.nnz, **(mod.decision or {})})
        elif getattr(mod, "capllm_decision", None) is not None:
            rows.append({"name": name, "path": "dense", "rank": 0, **mod.capllm_decision})
    return {"modules": rows, "summary": dict(Counter(r["path"] for r in rows))}
