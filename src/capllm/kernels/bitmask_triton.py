"""The bitmask kernel on CUDA, in Triton: ``y = x Sᵀ`` for a few tokens (decode) and the unpack.

One program owns ``BLOCK_M`` rows and walks their columns ``BLOCK_N`` at a time. For a tile it
reads the ``BLOCK_N / 8`` mask bytes of each row, expands them to bits ``b (BLOCK_M, BLOCK_N)``,
and finds each set entry's slot among the row's values as

    slot[i, j] = row_ptr[i] + seen[i] + Σ_{j' < j} b[i, j']      (an exclusive prefix sum)

where ``seen[i]`` counts the row's set bits in earlier tiles. The values are gathered at those
slots (masked by ``b``: only ``nnz`` values and ``m·n/8`` mask bytes are read), widened to fp32,
and multiplied with the tile of ``x`` for every token (at most ``MAX_TOKENS``, unrolled); the
products accumulate in fp32. Batch-1 decode is bound by the weight bytes read, so reading ~53 %
of the dense fp32 bytes at 50 % density (56 % of bf16) is where the speed comes from.

Optional: without Triton or a CUDA device :func:`available` is false and callers unpack
(:mod:`capllm.kernels.reference`). ``TRITON_INTERPRET=1`` runs the same kernels on CPU tensors
(the tests use this on machines without a GPU).
"""

from __future__ import annotations

import os

import torch

MAX_TOKENS = 8

try:
    import triton
    import triton.language as tl

    _REASON = None
except Exception as exc:  # not installed, or broken: callers unpack instead
    triton = tl = None
    _REASON = f"Triton is not importable ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available() -> bool:
    """Triton imports and there is a CUDA device (or the interpreter is on)."""
    return triton is not None and (interpreted() or torch.cuda.is_available())


def unavailable_reason() -> str | None:
    if triton is None:
        return _REASON
    if not available():
        return "no CUDA device for the Triton kernel"
    return None


if triton is not None:

    @triton.jit
    def _tile_slots(bm_ptr, rp_ptr, rows, cols0, nb, n, seen, row_ok, BLOCK_N: tl.constexpr):
        cols = cols0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        ok = row_ok[:, None] & col_ok[None, :]
        byte = tl.load(bm_ptr + rows[:, None].to(tl.int64) * nb + (cols // 8)[None, :], mask=ok, other=0).to(tl.int32)
        bit = (byte >> (cols % 8)[None, :]) & 1
        incl = tl.cumsum(bit, axis=1)
        rp = tl.load(rp_ptr + rows, mask=row_ok, other=0)
        slot = rp[:, None] + seen[:, None] + (incl - bit).to(tl.int64)
        return cols, col_ok, bit, slot, seen + tl.sum(bit, axis=1).to(tl.int64)

    @triton.jit
    def _spmv_kernel(x_ptr, v_ptr, bm_ptr, rp_ptr, y_ptr, m, n, nb, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TOKENS: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < m
        seen = tl.zeros((BLOCK_M,), dtype=tl.int64)
        acc = tl.zeros((TOKENS, BLOCK_M), dtype=tl.float32)
        tok = tl.arange(0, TOKENS)
        for c0 in range(0, n, BLOCK_N):
            cols, col_ok, bit, slot, seen = _tile_slots(bm_ptr, rp_ptr, rows, c0, nb, n, seen, row_ok, BLOCK_N)
            w = tl.load(v_ptr + slot, mask=bit != 0, other=0.0).to(tl.float32)
            xs = tl.load(x_ptr + tok[:, None] * n + cols[None, :], mask=(tok[:, None] < T) & col_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w[None, :, :] * xs[:, None, :], axis=2)
        tl.store(y_ptr + tok[:, None] * m + rows[None, :], acc, mask=(tok[:, None] < T) & row_ok[None, :])

    @triton.jit
    def _unpack_kernel(v_ptr, bm_ptr, rp_ptr, out_ptr, m, n, nb, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < m
        seen = tl.zeros((BLOCK_M,), dtype=tl.int64)
        for c0 in range(0, n, BLOCK_N):
            cols, col_ok, bit, slot, seen = _tile_slots(bm_ptr, rp_ptr, rows, c0, nb, n, seen, row_ok, BLOCK_N)
            w = tl.load(v_ptr + slot, mask=bit != 0, other=0.0).to(tl.float32)
            tl.store(out_ptr + rows[:, None].to(tl.int64) * n + cols[None, :], w, mask=row_ok[:, None] & col_ok[None, :])


def _blocks(n: int) -> tuple[int, int]:
    return 16, 128 if n >= 128 else max(16, 1 << (max(n, 1) - 1).bit_length())


def spmv(x: torch.Tensor, packed) -> torch.Tensor:
    """``x (T, n) → x Sᵀ (T, m)`` in fp32 for ``packed`` (a :class:`~capllm.kernels.BitmaskMatrix`)."""
    m, n = packed.shape
    x = x.contiguous()
    T = x.shape[0]
    y = torch.empty(T, m, dtype=torch.float32, device=x.device)
    bm, bn = _blocks(n)
    for t0 in range(0, T, MAX_TOKENS):  # token blocks: one decode of the mask per block
        xt = x[t0:t0 + MAX_TOKENS]
        tokens = max(2, 1 << (xt.shape[0] - 1).bit_length())  # power of two ≥ the block
        _spmv_kernel[(triton.cdiv(m, bm),)](xt, packed.values, packed.bitmask, packed.row_ptr, y[t0:t0 + MAX_TOKENS], m, n, packed.bitmask.shape[1], xt.shape[0], BLOCK_M=bm, BLOCK_N=bn, TOKENS=tokens)
    return y


def unpack(packed) -> torch.Tensor:
    """Dense fp32 ``(m, n)``."""
    m, n = packed.shape
    out = torch.empty(m, n, dtype=torch.float32, device=packed.device)
    bm, bn = _blocks(n)
    _unpack_kernel[(triton.cdiv(m, bm),)](packed.values, packed.bitmask, packed.row_ptr, out, m, n, packed.bitmask.shape[1], BLOCK_M=bm, BLOCK_N=bn)
    return out
