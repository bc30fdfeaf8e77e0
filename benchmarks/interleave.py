"""Interleaved timing for the in-process A/B benchmarks (``decode_ab.py``, ``prefill_breakdown.py``).

Every case runs once per round, the cases taking turns, so drift on a shared machine falls on all
of them alike; the caller reduces each case's list (fastest run, median).
"""

from __future__ import annotations

import time
from typing import Callable


def interleaved_runs(cases: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call of each case: ``warmup`` untimed calls of every case, then ``rounds``
    rounds in which every case runs once, in order."""
    for _ in range(warmup):
        for f in cases.values():
            f()
    runs: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for k, f in cases.items():
            t = time.perf_counter()
            f()
            runs[k].append(time.perf_counter() - t)
    return runs
