"""Which kernel runs ``S x``: the packed bitmask kernel, dense, or CSR — chosen per layer, per
device and per token count at load time, by measuring once, and recorded.

Policy ``auto`` (the default), for each sparse part ``S (m × n)`` of density ``d``:

1. **bitmask kernel** (:mod:`capllm.kernels`) when one serves the device and packing pays
   (``d < 1 − 1/(8·itemsize)``): a probe times the kernel against the dense GEMM at
   :data:`DECODE_TOKENS` tokens, DRAM-bound (cycling through distinct copies of the matrix that
   together exceed the last-level cache, up to :data:`PROBE_MAX_BYTES`, because in a model's decode step every weight comes
   from DRAM, and batch-1 decode is bound by the bytes read). ``kernel_max_tokens`` is the largest probed token count up to which the kernel takes
   at most :data:`KERNEL_SLACK` × the dense time — a tie goes to the kernel, because the layer
   then holds only the packed bytes (~half of dense at 50 % density), which is also what makes
   the whole model's decode faster; longer inputs (prefill) unpack ``S`` once per call and run
   the dense GEMM — the probe also times that at :data:`PREFILL_TOKENS` tokens and records it as
   ``prefill_ratio``. If the kernel loses clearly even at one token the layer goes to rule 2.
   On a CPU with AVX-512 the probe also times the kernel's AVX2 path and keeps the faster
   (``kernel_isa``): on AMD Zen 5 the AVX-512 path's ``vexpandps`` bounds the decode and the AVX2
   path (a permutation table) takes 0.67–0.91× its time at densities ≤ 0.5 (benchmarks/isa_ab.py),
   while on an Intel Xeon the AVX-512 path was the faster.
2. density above :data:`AUTO_CSR_MAX_DENSITY` (10 %) → **dense**. On the 2-core CPU here
   torch's CSR × dense product was 2.5–4× *slower* than dense at 50 % density
   (benchmarks/format.md).
3. otherwise a hot timing probe of CSR against dense on ``PROBE_TOKENS`` tokens; CSR only when
   at least 10 % faster.

Probes are cached per (device, threads, shape, dtypes and density — to 10 % for the kernel's,
1 % for CSR's), so same-shaped layers probe once. Policies ``dense``, ``csr`` and ``kernel`` force one layout everywhere (for
measurements; ``kernel`` keeps ``kernel_max_tokens`` at its default). Every choice is kept on the
module (``LowRankSparseLinear.decision``, or ``capllm_decision`` on a plain ``nn.Linear``/``Conv1D``
that the dense fallback restores) and :func:`describe_execution` lists them.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from capllm.errors import CapllmError
from capllm.format.modules import DEFAULT_KERNEL_MAX_TOKENS, LowRankSparseLinear, to_csr
from capllm.kernels import BitmaskMatrix, cpu_build, kernel_backend, kernel_unavailable_reason

POLICIES = ("auto", "dense", "csr", "kernel")
AUTO_CSR_MAX_DENSITY = 0.10
PROBE_TOKENS = 16
PROBE_REPEATS = 5
CSR_MARGIN = 0.9  # CSR must take < 90 % of the dense time
DECODE_TOKENS = (1, 8)
PREFILL_TOKENS = 128
KERNEL_ISA_MARGIN = 0.97  # the AVX2 path replaces the AVX-512 one only when it takes < 97 % of its time
KERNEL_SLACK = 1.10  # the kernel may take up to 110 % of the cache-cold dense time (it holds ~half the bytes)
COLD_REPEATS = 3
# The DRAM-bound probe's distinct dense copies together span 2x the last-level cache, but at most
# this many bytes: a server CPU can report a shared L3 of 480 MB, and 2x that per probed shape (plus
# the packed copies) raised the peak RSS of loading SmolLM2 CAP 50 % from ~0.25 GB to 1.6 GB, above
# the dense model's. Past the cap part of the sweep can hit in that L3, as part of a model's decode would.
PROBE_MAX_BYTES = 256 << 20
# With the CPU kernel built, every sweep starts from DRAM anyway: the probe evicts its copies
# (clflush) before each timed sweep, and the copies only amortise a call's start-up, so fewer do.
PROBE_FLUSHED_BYTES = 32 << 20

_probe_cache: dict[tuple, dict[str, Any]] = {}


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise CapllmError(f"unknown execution policy {policy!r}: use one of {', '.join(POLICIES)}")
    return policy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device: torch.device, repeats: int = PROBE_REPEATS) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def last_level_cache_bytes() -> int:
    """The largest CPU cache ``/sys`` reports for cpu0 (the L3 on every CPU here), 32 MiB if none."""
    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        txt = f.read_text().strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
        try:
            best = max(best, int(txt.rstrip("KMG")) * mult)
        except ValueError:
            pass
    return best or (32 << 20)


def probe(S: torch.Tensor, tokens: int = PROBE_TOKENS) -> dict[str, Any]:
    """Time ``S x`` dense and CSR on ``S``'s device for ``tokens`` random inputs (caches hot)."""
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


def sweep_ms(fns, device: torch.device, repeats: int = COLD_REPEATS, evict=None) -> float:
    """Median per-call ms of sweeps through ``fns`` (one call per distinct copy); ``evict()``, if
    given, runs untimed before each sweep (to start every sweep from DRAM)."""
    for f in fns:
        f()
    _sync(device)
    per = []
    for _ in range(repeats):
        if evict is not None:
            evict()
        t = time.perf_counter()
        for f in fns:
            f()
        _sync(device)
        per.append((time.perf_counter() - t) / len(fns) * 1e3)
    return statistics.median(per)


def kernel_isas(device: torch.device) -> tuple[str, ...]:
    """The kernel paths the probe times on ``device``: ``("auto",)`` (the kernel's own choice) except on
    a CPU with AVX-512, where the AVX2 path is timed beside it."""
    return ("avx512", "avx2") if device.type == "cpu" and cpu_build.best_isa() == "avx512" else ("auto",)


def pick_isa(ms: dict[str, dict[int, float]]) -> str:
    """The path with the lower one-token time; ``avx2`` replaces ``avx512`` only below
    :data:`KERNEL_ISA_MARGIN` × its time (a tie keeps the wider path)."""
    if set(ms) != {"avx512", "avx2"}:
        return next(iter(ms))
    t1 = DECODE_TOKENS[0]
    return "avx2" if ms["avx2"][t1] < KERNEL_ISA_MARGIN * ms["avx512"][t1] else "avx512"


def probe_kernel(S: torch.Tensor, packed: BitmaskMatrix) -> dict[str, Any]:
    """DRAM-bound times of the packed kernel and the dense GEMM at :data:`DECODE_TOKENS` tokens,
    and of prefill (unpack + GEMM vs GEMM) at :data:`PREFILL_TOKENS` tokens.

    As in a model's decode step, where each layer's weights come from DRAM: the probe cycles
    through ``copies`` distinct copies of both forms, so no call finds its matrix in cache; one
    call's time is a sweep's time over the number of copies (a single call would mostly time the
    start-up latency of the first misses, which swamps a small matrix). With the CPU kernel built
    every sweep starts from DRAM (its ``flush`` op evicts the copies first) and the copies span
    :data:`PROBE_FLUSHED_BYTES`; without it they span twice the last-level cache (L2 on a GPU), at
    most :data:`PROBE_MAX_BYTES`."""
    dev = S.device
    llc = last_level_cache_bytes() if dev.type == "cpu" else 64 << 20
    ops = cpu_build.load() if dev.type == "cpu" else None
    flush = getattr(ops, "flush", None) if ops is not None else None
    span = min(2 * llc, PROBE_FLUSHED_BYTES if flush else PROBE_MAX_BYTES)
    copies = int(min(256, max(1, -(-span // (S.numel() * S.element_size())))))
    dense = [S] + [S.clone() for _ in range(copies - 1)]
    packs = [packed] + [BitmaskMatrix(packed.values.clone(), packed.bitmask.clone(), packed.row_ptr, packed.shape) for _ in range(copies - 1)]
    evict_dense = (lambda: [flush(W) for W in dense]) if flush else None  # noqa: E731
    evict_packed = (lambda: [flush(t) for P in packs for t in (P.values, P.bitmask, P.row_ptr)]) if flush else None  # noqa: E731
    isas = kernel_isas(dev)
    out: dict[str, Any] = {"dense_cold_ms": {}, "probe_copies": copies, "probe_flushed": flush is not None}
    by_isa: dict[str, dict[int, float]] = {isa: {} for isa in isas}
    with torch.inference_mode():
        for t in DECODE_TOKENS:
            x = torch.randn(t, S.shape[1], dtype=S.dtype, device=dev)
            out["dense_cold_ms"][t] = round(sweep_ms([lambda W=W: F.linear(x, W) for W in dense], dev, evict=evict_dense), 4)
            for isa in isas:
                by_isa[isa][t] = round(sweep_ms([lambda P=P: P.matmul(x, isa=isa) for P in packs], dev, evict=evict_packed), 4)
        del dense[1:], packs[1:]
        x = torch.randn(PREFILL_TOKENS, S.shape[1], dtype=S.dtype, device=dev)
        base = _median_ms(lambda: F.linear(x, S), dev, COLD_REPEATS)
        unpacked = _median_ms(lambda: F.linear(x, packed.dense().to(S.dtype)), dev, COLD_REPEATS)
    out["prefill_ratio"] = round(unpacked / base, 4)
    out["kernel_isa"] = pick_isa(by_isa)
    out["kernel_ms"] = by_isa[out["kernel_isa"]]
    if len(by_isa) > 1:
        out["kernel_ms_by_isa"] = by_isa
    max_tokens = 0
    for t in DECODE_TOKENS:
        if out["kernel_ms"][t] > KERNEL_SLACK * out["dense_cold_ms"][t]:
            break
        max_tokens = t
    out["kernel_max_tokens"] = max_tokens
    return out


def _packing_pays(density: float, itemsize: int) -> bool:
    return density < 1 - 1 / (8 * itemsize)


def _base_decision(policy: str, density: float, device: torch.device) -> dict[str, Any]:
    decision: dict[str, Any] = {"policy": policy, "density": round(density, 6), "device": str(device)}
    if device.type == "cpu":
        decision["threads"] = torch.get_num_threads()
    return decision


def forced_layout(policy: str, shape: tuple[int, int], nnz: int, device: torch.device) -> tuple[str, dict[str, Any]]:
    """``(policy, decision)`` for the policies that choose nothing (``dense``, ``csr``): no probe,
    and nothing of the matrix is needed but its size."""
    if policy not in ("dense", "csr"):
        raise ValueError(f"policy {policy!r} is not a forced layout")
    m, n = shape
    return policy, {**_base_decision(policy, nnz / (m * n), device), "reason": f"forced by policy {policy}"}


def choose_layout(S: torch.Tensor | BitmaskMatrix, policy: str = "auto", value_dtype: torch.dtype | None = None,
                  dense_dtype: torch.dtype | None = None) -> tuple[str, dict[str, Any]]:
    """``("dense" | "csr" | "bitmask", decision)`` for a sparse part on its target device.

    ``S``: the dense matrix, or the part already in the bitmask layout (a
    :class:`~capllm.kernels.BitmaskMatrix`, then unpacked only if a probe needs it — a layer whose
    probe is cached costs no dense copy); ``value_dtype``: the dtype the bitmask layout stores the
    values in (default ``S``'s); ``dense_dtype``: a packed ``S``'s dtype as a dense matrix.
    """
    if isinstance(S, BitmaskMatrix):
        packed, (m, n), nnz, device = S, S.shape, S.nnz, S.device
        dtype = dense_dtype or S.dtype
        dense = lambda: packed.dense().to(dtype)  # noqa: E731
        vdt = S.dtype
    else:
        packed, (m, n), nnz, device, dtype = None, S.shape, int((S != 0).sum()), S.device, S.dtype
        dense = lambda: S  # noqa: E731
        vdt = value_dtype or S.dtype
    if policy in ("dense", "csr"):
        return forced_layout(policy, (m, n), nnz, device)
    density = nnz / (m * n)
    threads = torch.get_num_threads() if device.type == "cpu" else None
    decision = _base_decision(policy, density, device)
    backend = kernel_backend(device)
    if policy == "kernel":
        why = "forced by policy kernel" + ("" if backend else f" (no kernel here: {kernel_unavailable_reason(device)}; runs by unpacking)")
        return "bitmask", {**decision, "backend": backend, "kernel_max_tokens": DEFAULT_KERNEL_MAX_TOKENS, "kernel_isa": "auto", "reason": why}
    if backend is None:
        decision["kernel"] = f"unavailable: {kernel_unavailable_reason(device)}"
    elif not _packing_pays(density, torch.finfo(vdt).bits // 8):
        decision["kernel"] = f"density {density:.3f}: packing does not pay"
    else:
        key = ("kernel", str(device), threads, m, n, round(density * 10) / 10, dtype, vdt)
        if key not in _probe_cache:
            Sd = dense()
            _probe_cache[key] = probe_kernel(Sd, packed if packed is not None else BitmaskMatrix.from_dense(Sd, vdt))
            del Sd
        timing = _probe_cache[key]
        if timing["kernel_max_tokens"] > 0:
            t1 = DECODE_TOKENS[0]
            return "bitmask", {**decision, "backend": backend, **timing,
                               "reason": f"probe (DRAM-bound, {t1} token): kernel ({timing['kernel_isa']}) {timing['kernel_ms'][t1]} ms vs dense {timing['dense_cold_ms'][t1]} ms"}
        decision.update({k: timing[k] for k in ("kernel_isa", "kernel_ms", "kernel_ms_by_isa", "dense_cold_ms") if k in timing},
                        backend=backend, kernel="slower than dense at 1 token")
    if density > AUTO_CSR_MAX_DENSITY:
        return "dense", {**decision, "reason": f"density {density:.3f} > {AUTO_CSR_MAX_DENSITY}: CSR does not pay"}
    key = (str(device), threads, m, n, round(density, 2), dtype)
    if key not in _probe_cache:
        _probe_cache[key] = probe(dense())
    timing = _probe_cache[key]
    csr_ok = timing["csr_ms"] is not None and timing["csr_ms"] < CSR_MARGIN * timing["dense_ms"]
    layout = "csr" if csr_ok else "dense"
    return layout, {**decision, **timing, "reason": f"probe: csr {timing['csr_ms']} ms vs dense {timing['dense_ms']} ms"}


def describe_execution(model: nn.Module) -> dict[str, Any]:
    """Which path each compressed layer of ``model`` runs, why, and a count per path."""
    rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, LowRankSparseLinear):
            row = {"name": name, "path": mod.execution, "rank": mod.rank, "nnz": mod.nnz, **(mod.decision or {})}
            if mod.sparse_layout == "bitmask":
                row["kernel_max_tokens"] = mod.kernel_max_tokens
                row["kernel_isa"] = mod.kernel_isa
            rows.append(row)
        elif getattr(mod, "capllm_decision", None) is not None:  # a plain module the dense fallback restored, or the remote-code class's layer
            U = getattr(mod, "U", None)
            rows.append({"name": name, "path": mod.capllm_decision.get("layout", "dense"), "rank": 0 if U is None else U.shape[1], **mod.capllm_decision})
    return {"modules": rows, "summary": dict(Counter(r["path"] for r in rows))}
