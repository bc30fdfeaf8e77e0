"""The packed bitmask kernels (capllm.kernels) against an independent float64 dense product:
every CPU path this machine has (AVX-512, AVX2, scalar), the Triton kernel under Triton's
interpreter, the pure-torch fallback, the compressed module's decode and prefill paths, and
load → decode through both loaders on every architecture the format supports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import capllm
from capllm.format.execution import choose_layout
from capllm.format.modules import LowRankSparseLinear
from capllm.kernels import BitmaskMatrix, cpu_build, reference

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
SRC = Path(capllm.__file__).resolve().parents[1]
SHAPES = [(1, 1), (3, 7), (5, 16), (9, 17), (33, 129), (16, 200), (6, 1030), (11, 4100)]  # the last two: long rows (row-blocked AVX-512 path)
DENSITIES = [0.0, 0.05, 0.3, 0.5, 0.7, 1.0]
TOKENS = [1, 2, 3, 4, 5, 8, 9]


def _sparse(shape, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * (torch.rand(*shape, generator=g) < density)


def _isas():
    if cpu_build.load() is None:
        return []
    best = cpu_build.best_isa()
    return {"avx512": ["scalar", "avx2", "avx2-rowwise", "avx512", "avx512-rowwise"], "avx2": ["scalar", "avx2", "avx2-rowwise"], "scalar": ["scalar"]}[best]


def test_the_cpu_kernel_builds_here():
    """This machine has a compiler: the kernel must build (CI checks the build, not just the fallback)."""
    if os.environ.get("CAPLLM_NO_KERNELS"):
        pytest.skip("kernels disabled by CAPLLM_NO_KERNELS")
    assert cpu_build.load() is not None, cpu_build.unavailable_reason()
    assert cpu_build.best_isa() in ("avx512", "avx2", "scalar")


def test_the_cpu_kernel_runs_on_torchs_threads():
    """The kernel's at::parallel_for must really fork (it silently runs on one thread when the
    extension is compiled without -fopenmp, as it was until 2026-12-03), and the product must not
    depend on the thread count."""
    if cpu_build.load() is None:
        pytest.skip(f"no CPU kernel: {cpu_build.unavailable_reason()}")
    if not torch.backends.openmp.is_available():
        pytest.skip("torch is not built with OpenMP")
    if cpu_build.serial_reason():
        pytest.skip(cpu_build.serial_reason())
    ops, before = cpu_build.load(), torch.get_num_threads()
    S = _sparse((300, 200), 0.5)
    P = BitmaskMatrix.from_dense(S)
    x = torch.randn(3, 200)
    try:
        torch.set_num_threads(1)
        assert ops.parallel_threads() == 1
        one = P.matmul(x)
        torch.set_num_threads(3)
        assert ops.parallel_threads() == 3
        assert torch.equal(P.matmul(x), one)  # each row is one thread's: the same sums in the same order
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}" for m, n in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_cpu_kernel_equals_the_dense_product(shape, dtype):
    isas = _isas()
    if not isas:
        pytest.skip(f"no CPU kernel: {cpu_build.unavailable_reason()}")
    for density in DENSITIES:
        S = _sparse(shape, density)
        P = BitmaskMatrix.from_dense(S, dtype)
        Sd = S.to(dtype).double()  # the stored values, exactly
        assert P.nnz == int((S != 0).sum())
        for isa in isas:
            assert torch.equal(P.dense(isa), Sd.float()), (isa, density)
            for T in TOKENS:
                x = torch.randn(T, shape[1])
                want = x.double() @ Sd.t()
                got = P.matmul(x, isa)
                assert got.dtype == torch.float32 and got.shape == (T, shape[0])
                assert (got.double() - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item()), (isa, density, T)


@pytest.mark.parametrize("rank, bias", [(0, True), (1, False), (6, True), (200, False)])  # 200: x V by loops at 1 token, by BLAS at 8
def test_fused_low_rank_sparse_layer_in_one_call(rank, bias):
    """``x Sᵀ + (x V) Uᵀ + b`` in one kernel call equals the float64 product, on every path."""
    g = torch.Generator().manual_seed(5)
    m, n = 29, 70
    S = _sparse((m, n), 0.5, seed=6)
    U, V = (torch.randn(m, rank, generator=g), torch.randn(n, rank, generator=g)) if rank else (None, None)
    b = torch.randn(m, generator=g) if bias else None
    P = BitmaskMatrix.from_dense(S)
    for T in (1, 3, 8):
        x = torch.randn(T, n, generator=g)
        want = x.double() @ S.double().t()
        if rank:
            want += (x.double() @ V.double()) @ U.double().t()
        if bias:
            want += b.double()
        for isa in _isas() or ["auto"]:
            got = P.matmul(x, isa, U=U, V=V, bias=b)
            assert (got.double() - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item()), (isa, T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_unpack_rows_with_the_low_rank_part_on_every_path(dtype):
    """``unpack_rows`` writes rows [r0, r1) of ``S + U Vᵀ`` (AVX-512 and AVX2, four rows at a time
    or one, with the rank-r FMAs fused into the store; scalar with a separate add), against
    float64; row ranges that are not multiples of the 4-row block, odd widths, rank 0..5."""
    isas = _isas()
    if not isas:
        pytest.skip(f"no CPU kernel: {cpu_build.unavailable_reason()}")
    import capllm.kernels.bitmask as bitmask

    ops = cpu_build.load()
    g = torch.Generator().manual_seed(11)
    for (m, n) in [(1, 1), (7, 17), (13, 70), (10, 33)]:
        S = _sparse((m, n), 0.5, seed=m + n)
        P = BitmaskMatrix.from_dense(S, dtype)
        for rank in (0, 1, 5):
            U, V = torch.randn(m, rank, generator=g), torch.randn(n, rank, generator=g)
            want = S.to(dtype).double() + U.double() @ V.double().t()
            for r0, r1 in [(0, m), (1, m), (0, m - 1), (m // 2, m)]:
                for isa in isas:
                    out = torch.full((r1 - r0, n), float("nan"))
                    got = ops.unpack_rows(P.values, P.bitmask, P.row_ptr, n, r0, r1, out, bitmask._ISA[isa],
                                          U if rank else None, V.t().contiguous() if rank else None)
                    assert got.data_ptr() == out.data_ptr()
                    err = (got.double() - want[r0:r1]).abs().max().item() if r1 > r0 else 0.0
                    assert err <= 1e-5 * max(1.0, want.abs().max().item()), (m, n, rank, r0, r1, isa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_unpack_cols_writes_each_column_block_on_every_path(dtype):
    """``unpack_cols`` writes columns [c0, c1) of ``S + U Vᵀ`` (every vector path, four rows at a
    time and the rest one by one, and scalar), starting each row at ``col_ptr`` — checked against
    float64 for every block of widths 16 / 32 / 48, with a last block that is partial, not a
    multiple of 8 or 16 wide, at ranks 0, 1, 5 (fused, and the scalar path's separate add)."""
    isas = _isas()
    if not isas:
        pytest.skip(f"no CPU kernel: {cpu_build.unavailable_reason()}")
    import capllm.kernels.bitmask as bitmask

    ops = cpu_build.load()
    g = torch.Generator().manual_seed(12)
    for (m, n) in [(1, 17), (7, 70), (6, 100), (9, 33)]:
        S = _sparse((m, n), 0.5, seed=m * n)
        P = BitmaskMatrix.from_dense(S, dtype)
        for rank in (0, 1, 5):
            U, V = torch.randn(m, rank, generator=g), torch.randn(n, rank, generator=g)
            want = S.to(dtype).double() + U.double() @ V.double().t()
            for width in (16, 32, 48):
                starts = P.col_ptr(width)
                assert len(starts) == -(-n // width)
                for b, c0 in enumerate(range(0, n, width)):
                    c1 = min(n, c0 + width)
                    for isa in isas:
                        out = torch.full((m, c1 - c0), float("nan"))
                        got = ops.unpack_cols(P.values, P.bitmask, P.row_ptr, starts[b], n, c0, c1, out, bitmask._ISA[isa],
                                              U if rank else None, V[c0:c1].t().contiguous() if rank else None)
                        assert got.data_ptr() == out.data_ptr()
                        err = (got.double() - want[:, c0:c1]).abs().max().item()
                        assert err <= 1e-5 * max(1.0, want.abs().max().item()), (m, n, rank, width, c0, isa)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ops.unpack_cols(P.values, P.bitmask, P.row_ptr, P.col_ptr(16)[0], n, 8, 24, torch.empty(m, 16), 0, None, None)


@pytest.mark.parametrize("chunk_bytes", [4 << 20, 4 * 7 * 16, 4 * 7 * 32])
def test_prefill_of_a_wide_matrix_in_column_blocks_equals_the_dense_layer(chunk_bytes, monkeypatch):
    """n > m: the prefill accumulates x[:, block] · (unpack(S) + UVᵀ)[:, block]ᵀ over blocks of
    columns (one block; 16- and 32-wide blocks with a partial last one) — equal to the dense layer,
    fused and addmm ranks, with a bias; the column path really ran (its row starts are cached)."""
    import threading

    import capllm.kernels.bitmask as bitmask

    if cpu_build.load() is None:
        pytest.skip(f"no CPU kernel: {cpu_build.unavailable_reason()}")
    monkeypatch.setattr(bitmask, "_tls", threading.local())
    g = torch.Generator().manual_seed(17)
    m, n = 7, 70
    S = _sparse((m, n), 0.5, seed=9)
    P = BitmaskMatrix.from_dense(S)
    for r in (0, 3, bitmask.fused_unpack_max_rank() + 2):
        U, V = (torch.randn(m, r, generator=g), torch.randn(n, r, generator=g)) if r else (None, None)
        b = torch.randn(m, generator=g)
        x = torch.randn(2, 40, n, generator=g)
        W = S.double() + (U.double() @ V.double().t() if r else 0)
        want = x.double() @ W.t() + b.double()
        got = P.linear_prefill(x, U, V, b, chunk_bytes=chunk_bytes)
        assert got.shape == (2, 40, m) and (got.double() - want).abs().max() <= 1e-5 * want.abs().max().item()
        width = (chunk_bytes // (4 * m)) // 16 * 16
        assert (P._col_ptr is not None and P._col_ptr[0] == width) == (width < n)


@pytest.mark.parametrize("chunk_bytes", [4 << 20, 4 * 70 * 5, 1])
def test_prefill_in_row_blocks_equals_the_dense_layer(chunk_bytes, monkeypatch):
    """The prefill GEMM over row blocks of unpack(S) + UVᵀ (one block, blocks of 5 rows, 1 row)."""
    import threading

    import capllm.kernels.bitmask as bitmask

    monkeypatch.setattr(bitmask, "_tls", threading.local())  # no buffer yet: the first call makes it
    g = torch.Generator().manual_seed(7)
    m, n = 23, 70
    S = _sparse((m, n), 0.5, seed=8)
    P = BitmaskMatrix.from_dense(S)
    for r in (3, bitmask.fused_unpack_max_rank() + 2):  # U Vᵀ fused into the unpack (at rank 3 on AVX2 / AVX-512), and by addmm
        U, V, b = torch.randn(m, r, generator=g), torch.randn(n, r, generator=g), torch.randn(m, generator=g)
        x = torch.randn(2, 40, n, generator=g)
        want = x.double() @ (S.double() + U.double() @ V.double().t()).t() + b.double()
        with torch.inference_mode():  # the reused buffer made under inference mode must work outside it too
            inside = P.linear_prefill(x, U, V, b, chunk_bytes=chunk_bytes)
        got = P.linear_prefill(x, U, V, b, chunk_bytes=chunk_bytes)
        assert got.shape == (2, 40, m) and (got.double() - want).abs().max() <= 1e-5 * want.abs().max().item()
        assert torch.equal(inside, got)


def test_kernel_keeps_leading_dims_and_dtype_and_refuses_a_wrong_width():
    S = _sparse((12, 40), 0.5)
    P = BitmaskMatrix.from_dense(S)
    x = torch.randn(2, 3, 40)
    assert torch.allclose(P.matmul(x), x @ S.t(), atol=1e-5)
    xb = x.to(torch.bfloat16)
    assert P.matmul(xb).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="features"):
        P.matmul(torch.randn(1, 41))


def test_packed_layout_matches_the_format_and_refuses_corruption():
    from capllm.format.bitmask import pack_bitmask

    S = _sparse((9, 23), 0.4)
    v1, b1 = pack_bitmask(S)
    v2, b2 = reference.pack(S)
    assert torch.equal(v1, v2) and torch.equal(b1, b2)
    P = BitmaskMatrix.from_packed(v1, b1, S.shape)
    assert P.row_ptr.tolist() == [0, *(S != 0).sum(1).cumsum(0).tolist()]
    assert P.values.numel() == P.nnz + 16 and torch.equal(P.values[P.nnz:], torch.zeros(16))
    with pytest.raises(ValueError, match="corrupt"):
        BitmaskMatrix.from_packed(v1[:-1], b1, S.shape)
    with pytest.raises(ValueError, match="does not fit"):
        BitmaskMatrix.from_packed(v1, b1, (9, 40))


def test_without_the_compiled_kernel_everything_still_works(tmp_path):
    """CAPLLM_NO_KERNELS=1 (what a machine without a compiler sees): exact results by unpacking."""
    code = textwrap.dedent("""
        import torch
        from capllm.kernels import BitmaskMatrix, cpu_build, kernel_backend
        from capllm.format.execution import choose_layout
        assert cpu_build.load() is None and "CAPLLM_NO_KERNELS" in cpu_build.unavailable_reason()
        assert kernel_backend("cpu") is None
        S = torch.randn(20, 30) * (torch.rand(20, 30) < 0.5)
        x = torch.randn(3, 30)
        assert torch.allclose(BitmaskMatrix.from_dense(S).matmul(x), x @ S.t(), atol=1e-5)
        layout, why = choose_layout(S, "auto")
        assert layout == "dense" and why["kernel"].startswith("unavailable"), why
        print("ok")
    """)
    env = {**os.environ, "CAPLLM_NO_KERNELS": "1", "CAPLLM_CACHE": str(tmp_path), "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_triton_kernel_under_the_interpreter():
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from capllm.kernels import BitmaskMatrix, bitmask_triton as bt
        assert bt.available(), bt.unavailable_reason()
        for (m, n) in [(1, 1), (7, 17), (33, 140), (20, 300)]:
            for d in (0.0, 0.5, 1.0):
                S = torch.randn(m, n) * (torch.rand(m, n) < d)
                for dt in (torch.float32, torch.bfloat16):
                    P = BitmaskMatrix.from_dense(S, dt)
                    Sd = S.to(dt).double()
                    assert torch.equal(bt.unpack(P), Sd.float())
                    for T in (1, 3, 9):
                        x = torch.randn(T, n)
                        err = (bt.spmv(x, P).double() - x.double() @ Sd.t()).abs().max().item()
                        assert err <= 1e-5 * max(1.0, (x.double() @ Sd.t()).abs().max().item()), (m, n, d, dt, T, err)
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# --- the compressed module ----------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, 1, 5])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.8])
def test_module_decode_and_prefill_paths_equal_the_dense_reconstruction(rank, density):
    g = torch.Generator().manual_seed(3)
    m, n = 37, 53
    U, V = (torch.randn(m, rank, generator=g), torch.randn(n, rank, generator=g)) if rank else (None, None)
    S, b = _sparse((m, n), density, seed=4), torch.randn(m, generator=g)
    mod = LowRankSparseLinear.from_factors(U, V, S, b)
    W = (U @ V.t() if rank else 0) + S
    mod.set_sparse_layout("bitmask")
    assert mod.sparse_layout == "bitmask" and mod.S is None and mod.nnz == int((S != 0).sum())
    assert mod.execution == ("lowrank+bitmask" if rank else "bitmask")
    for T in (1, 3, mod.kernel_max_tokens, mod.kernel_max_tokens + 1, 40):  # decode (kernel) and prefill (unpack + GEMM)
        x = torch.randn(2, T, n)
        want = x.double() @ torch.as_tensor(W).double().t() + b.double()
        assert (mod(x).double() - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item()), T
    assert torch.equal(mod.sparse_dense(), S) and torch.allclose(mod.weight, torch.as_tensor(W) + 0.0, atol=1e-6)
    mod.set_sparse_layout("dense")
    assert mod.sparse_layout == "dense" and torch.equal(mod.S, S) and not hasattr(mod, "S_values")


def test_bf16_value_storage_rounds_each_value_once():
    S = _sparse((24, 48), 0.5)
    mod = LowRankSparseLinear.from_factors(None, None, S, None).set_sparse_layout("bitmask", torch.bfloat16)
    assert mod.S_values.dtype == torch.bfloat16
    x = torch.randn(1, 48)
    assert torch.allclose(mod(x).double(), x.double() @ S.to(torch.bfloat16).double().t(), atol=1e-5)
    assert mod.sparse_dense().dtype == torch.float32  # the dense form keeps the layer's dtype


def test_auto_policy_records_the_kernel_probe():
    if cpu_build.load() is None:
        pytest.skip(f"no CPU kernel: {cpu_build.unavailable_reason()}")
    S = _sparse((256, 512), 0.5)
    layout, why = choose_layout(S, "auto")
    assert why["backend"].startswith("cpu-") and set(why["kernel_ms"]) == {1, 8}
    assert (layout == "bitmask") == (why["kernel_ms"][1] <= 1.10 * why["dense_cold_ms"][1])
    if layout == "bitmask":
        assert why["kernel_max_tokens"] >= 1 and why["prefill_ratio"] > 0
    assert choose_layout(S, "kernel")[0] == "bitmask"
    if cpu_build.best_isa() == "avx512":  # both vector paths timed, the faster one kept
        assert set(why["kernel_ms_by_isa"]) == {"avx512", "avx2"} and why["kernel_ms"] == why["kernel_ms_by_isa"][why["kernel_isa"]]
    else:
        assert why["kernel_isa"] == "auto" and "kernel_ms_by_isa" not in why
    dense_only = torch.randn(64, 64)  # packing cannot pay at density 1
    assert "does not pay" in choose_layout(dense_only, "auto")[1]["kernel"]


def test_pick_isa_keeps_avx512_unless_avx2_is_clearly_faster():
    from capllm.format.execution import KERNEL_ISA_MARGIN, pick_isa

    t = lambda a512, a2: {"avx512": {1: a512, 8: 1.0}, "avx2": {1: a2, 8: 9.0}}  # noqa: E731 (only the 1-token time counts)
    assert pick_isa(t(1.0, 0.8)) == "avx2"
    assert pick_isa(t(1.0, 1.0)) == "avx512"  # a tie keeps the wider path
    assert pick_isa(t(1.0, KERNEL_ISA_MARGIN + 0.001)) == "avx512"
    assert pick_isa(t(1.0, 1.2)) == "avx512"
    assert pick_isa({"auto": {1: 1.0, 8: 2.0}}) == "auto"


def test_loader_decodes_on_the_probed_isa(saved_models, monkeypatch):
    """`auto` records the probe's path on each bitmask module and decode calls the kernel with it;
    both paths give the in-memory model's logits."""
    if cpu_build.best_isa() != "avx512":
        pytest.skip(f"one vector path on this CPU ({cpu_build.best_isa()})")
    from test_format import IDS

    from capllm.format import execution

    d, ref = saved_models[("llama", "cap")]
    calls = []
    matmul = BitmaskMatrix.matmul
    monkeypatch.setattr(BitmaskMatrix, "matmul", lambda self, x, isa="auto", **kw: (calls.append(isa), matmul(self, x, isa=isa, **kw))[1])
    for planted in ("avx2", "avx512"):
        execution._probe_cache.clear()
        monkeypatch.setattr(execution, "pick_isa", lambda ms, planted=planted: planted)
        monkeypatch.setattr(execution, "KERNEL_SLACK", 1e9)  # the kernel path whatever the timing on a loaded machine
        model, _ = capllm.load_compressed(d, execution="auto")
        rows = [r for r in capllm.describe_execution(model)["modules"] if "bitmask" in r["path"]]
        assert rows and all(r["kernel_isa"] == planted for r in rows)
        calls.clear()
        got = _incremental_logits(model, IDS, prompt=12)
        assert calls and set(calls) == {planted}
        assert (got - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    execution._probe_cache.clear()


def test_kernel_probe_working_set_is_bounded(monkeypatch):
    """The DRAM-bound probe's copies span 2x the last-level cache but never more than
    PROBE_MAX_BYTES (PROBE_FLUSHED_BYTES when the kernel evicts them before each sweep): a huge
    reported L3 must not turn loading a model into GBs of copies."""
    from capllm.format import execution

    S = _sparse((64, 128), 0.5)
    P = BitmaskMatrix.from_dense(S)
    size = S.numel() * S.element_size()
    monkeypatch.setattr(execution, "last_level_cache_bytes", lambda: 1 << 40)
    monkeypatch.setattr(execution, "PROBE_MAX_BYTES", 10 * size)
    monkeypatch.setattr(execution, "PROBE_FLUSHED_BYTES", 6 * size)  # the span when the kernel can evict the copies
    kernel = cpu_build.load() is not None
    evicts = []
    sweep = execution.sweep_ms
    monkeypatch.setattr(execution, "sweep_ms", lambda fns, dev, repeats=3, evict=None: (evicts.append(evict), sweep(fns, dev, repeats, evict))[1])
    out = execution.probe_kernel(S, P)
    assert out["probe_copies"] == (6 if kernel else 10)
    assert out["probe_flushed"] == kernel and evicts and all((e is not None) == kernel for e in evicts)  # every sweep starts from DRAM
    if cpu_build.load() is not None:
        before = S.clone()
        cpu_build.load().flush(S)  # evicts, changes nothing
        assert torch.equal(S, before)
    monkeypatch.setattr(execution, "last_level_cache_bytes", lambda: 2 * size)  # a small cache: 2x it
    assert execution.probe_kernel(S, P)["probe_copies"] == 4


# --- load → decode on every architecture --------------------------------------------------------


def _incremental_logits(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of every position, computed as decode does: the prompt in one call, then one token
    per call with the KV cache (so the packed kernel runs on 1-token inputs)."""
    with torch.no_grad():
        out = model(ids[:, :prompt], use_cache=True)
        logits, past = [out.logits], out.past_key_values
        for t in range(prompt, ids.shape[1]):
            out = model(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            logits.append(out.logits)
            past = out.past_key_values
    return torch.cat(logits, 1)


ARCH_CASES = [("llama", "mixed"), ("qwen2", "mixed"), ("gpt2", "mixed"), ("opt", "mixed"), ("gpt2", "wanda"), ("llama", "cap")]


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    from test_format import IDS, _compress

    root = tmp_path_factory.mktemp("kernel-models")
    out = {}
    for arch, family in ARCH_CASES:
        model, _ = _compress(arch, family)
        with torch.no_grad():
            logits = model(IDS).logits
        d = root / f"{arch}-{family}"
        capllm.save_compressed(model, d)
        out[(arch, family)] = (d, logits)
    return out


@pytest.mark.parametrize("case", ARCH_CASES, ids=[f"{a}-{f}" for a, f in ARCH_CASES])
def test_kernel_decode_equals_the_in_memory_model(saved_models, case):
    from test_format import IDS

    d, ref = saved_models[case]
    model, _ = capllm.load_compressed(d, execution="kernel")
    summary = capllm.describe_execution(model)["summary"]
    assert all("bitmask" in path or path == "lowrank" for path in summary), summary
    got = _incremental_logits(model, IDS, prompt=12)  # 12 > 8 tokens: the prompt takes the prefill path
    assert (got - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


_REMOTE = textwrap.dedent("""
    import json, sys, torch
    if sys.argv[3] == "without-capllm":
        sys.modules["capllm"] = None  # `import capllm` now fails inside modeling_capllm
    isas = []
    if sys.argv[3] == "planted":  # capllm's policy answers: alternately the kernel (scalar path, 2 tokens) and dense
        from capllm.format import execution
        from capllm.kernels import BitmaskMatrix
        calls = []
        def planted(S, policy="auto", value_dtype=None, dense_dtype=None):
            calls.append(policy)
            if len(calls) % 2:
                return "bitmask", {"kernel_max_tokens": 2, "kernel_isa": "scalar", "reason": "planted"}
            return "dense", {"reason": "planted"}
        execution.choose_layout = planted
        matmul = BitmaskMatrix.matmul
        def spy(self, x, isa="auto", **kw):
            isas.append(isa)
            return matmul(self, x, isa=isa, **kw)
        BitmaskMatrix.matmul = spy
    from transformers import AutoModelForCausalLM
    ids = torch.tensor(json.loads(sys.argv[2]))
    m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    with torch.no_grad():
        out = m(ids[:, :12], use_cache=True)
        logits, past = [out.logits], out.past_key_values
        for t in range(12, ids.shape[1]):
            out = m(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            logits.append(out.logits)
            past = out.past_key_values
    used = sum(getattr(x, "_packed", None) is not None for x in m.modules())
    cached = sum(getattr(x, "_S_cache", None) is not None for x in m.modules())
    layouts = [x.capllm_decision["layout"] for x in m.modules() if getattr(x, "capllm_decision", None) is not None]
    if sys.argv[3] == "planted":
        import capllm
        summary = capllm.describe_execution(m)["summary"]
        assert summary == {"bitmask": 7, "dense": 7}, summary
    print(json.dumps({"logits": torch.cat(logits, 1).tolist(), "kernel_modules": used, "dense_cached": cached,
                      "layouts": layouts, "isas": sorted(set(isas)), "matmul_calls": len(isas)}))
""")


@pytest.mark.parametrize("mode", ["with-capllm", "without-capllm", "planted"])
def test_trust_remote_code_uses_the_kernel_when_capllm_is_there(saved_models, mode, tmp_path):
    """With capllm the remote-code class runs what capllm's execution policy chooses per layer (a
    planted policy's kernel layers, path and token limit reach every call; its dense layers are
    unpacked once); without capllm every ``S`` is unpacked once. Logits match the in-memory model
    to 1e-5 either way, prefill and decode."""
    from test_format import IDS

    d, ref = saved_models[("qwen2", "mixed")]
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_MODULES_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _REMOTE, str(d), json.dumps(IDS.tolist()), mode], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    got = torch.tensor(res["logits"])
    assert (got - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    kernel_here = cpu_build.load() is not None
    if mode == "without-capllm" or not kernel_here:
        assert res["kernel_modules"] == 0 and res["dense_cached"] == 14
    elif mode == "with-capllm":  # every layer follows the policy's measured choice
        assert len(res["layouts"]) == 14 and res["dense_cached"] == res["layouts"].count("dense")
        assert res["kernel_modules"] == 14  # the packed matrix is built for every layer before the policy is asked
    else:
        assert res["layouts"] == ["bitmask", "dense"] * 7 and res["dense_cached"] == 7
        # decode (a batch of 2 sequences: 2 tokens a step): each of the 7 kernel layers once a step; the prefill
        # (2 x 12 tokens > 2) never calls the kernel
        assert res["isas"] == ["scalar"] and res["matmul_calls"] == 7 * (IDS.shape[1] - 12)
