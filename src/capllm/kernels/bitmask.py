"""``BitmaskMatrix``: a sparse matrix held in capllm's bitmask layout, multiplied without unpacking.

Storage of ``S (m, n)`` with ``nnz`` non-zeros (the on-disk layout of :mod:`capllm.format.bitmask`
plus one derived index):

* ``values (nnz + PAD,)`` — the non-zeros, row-major, in ``float32``, ``bfloat16`` or ``float16``
  (the storage dtype; products accumulate in fp32), followed by ``PAD`` zeros that the vector
  loads may touch;
* ``bitmask (m, ceil(n/8)) uint8`` — bit ``j % 8`` of byte ``j // 8`` of row ``i`` set iff
  ``S[i, j] != 0``;
* ``row_ptr (m + 1,) int64`` — ``row_ptr[i] = Σ_{i' < i} nnz(row i')``, so row ``i``'s values
  start at ``values[row_ptr[i]]`` (built at load from the mask's popcounts; 8 bytes per row).

:meth:`matmul` computes ``y = x Sᵀ`` for ``x (..., n)``: on a CPU with the compiled kernel
(:mod:`capllm.kernels.cpu_build`) straight from the packed form; on CUDA with the Triton kernel
(:mod:`capllm.kernels.bitmask_triton`) when Triton is installed; anywhere else by unpacking to a
dense fp32 matrix first (:func:`capllm.kernels.reference.unpack`), which is exact but not fast.
:meth:`dense` unpacks (the prefill path: one unpack, then the dense GEMM).
"""

from __future__ import annotations

import threading

import torch

from capllm.kernels import cpu_build, reference

PAD = 16
PREFILL_CHUNK_BYTES = 16 << 20
# Up to this rank the prefill unpack adds U Vᵀ as it stores (r broadcast FMAs per 8/16 columns);
# beyond it MKL's addmm on the unpacked block is faster. `benchmarks/prefill_breakdown.py` on the
# four SmolLM2 shapes, 1 and 2 threads, fused / addmm — AVX2 (AMD Zen 3): 0.68-0.88 at r = 1,
# 0.69-0.93 at 4, 0.93-1.18 at 8, 1.20-1.79 at 16; AVX-512 (an Intel Xeon, 16 columns per FMA):
# 0.52-0.72 at r = 1, 0.57-0.69 at 4, 0.54-0.83 at 8, 0.68-0.97 at 16 (the same run gave the
# unpack + GEMM per matrix at 1.00-1.11x dense at 1 thread, 1.12-1.27x at 2). The scalar path
# always uses addmm.
FUSED_UNPACK_MAX_RANK = {"avx2": 4, "avx512": 16}


def fused_unpack_max_rank() -> int:
    """The largest rank whose ``U Vᵀ`` the prefill unpack adds itself on this CPU (0: never)."""
    return FUSED_UNPACK_MAX_RANK.get(cpu_build.best_isa() or "", 0)


_tls = threading.local()


def _workspace(numel: int) -> torch.Tensor:
    """A per-thread fp32 CPU buffer of at least ``numel`` elements (grown, never shrunk)."""
    ws = getattr(_tls, "ws", None)
    if ws is None or ws.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: writable inside and outside inference mode
            ws = _tls.ws = torch.empty(numel, dtype=torch.float32)
    return ws
VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ISA = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3, "avx512-rowwise": 4, "avx2-rowwise": 5}  # *-rowwise: one row at a time (tests, A/B)


def _triton():
    from capllm.kernels import bitmask_triton

    return bitmask_triton if bitmask_triton.available() else None


def kernel_backend(device: torch.device | str) -> str | None:
    """Which packed kernel serves ``device``: ``cpu-<isa>``, ``triton``, or ``None`` (unpack only)."""
    device = torch.device(device)
    if device.type == "cpu":
        isa = cpu_build.best_isa()
        return None if isa is None else f"cpu-{isa}"
    if device.type == "cuda":
        return "triton" if _triton() is not None else None
    return None


def kernel_unavailable_reason(device: torch.device | str) -> str | None:
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_build.unavailable_reason()
    if device.type == "cuda":
        from capllm.kernels import bitmask_triton

        return bitmask_triton.unavailable_reason()
    return f"no packed kernel for device type {device.type}"


class BitmaskMatrix:
    """A packed ``(m, n)`` sparse matrix; see the module docstring for the layout."""

    def __init__(self, values: torch.Tensor, bitmask: torch.Tensor, row_ptr: torch.Tensor, shape) -> None:
        self.values, self.bitmask, self.row_ptr = values, bitmask, row_ptr
        self.shape = (int(shape[0]), int(shape[1]))
        self._col_ptr: tuple[int, list[torch.Tensor]] | None = None  # (block width, each block's row starts): wide prefill

    def col_ptr(self, width: int) -> list[torch.Tensor]:
        """For column blocks ``[b·width, (b+1)·width)`` (``width`` a multiple of 8): each block's
        ``(m,) int64`` start of every row's values at the block's first column — ``row_ptr`` plus the
        set bits before it (a popcount-table prefix over the mask bytes; built once per width)."""
        if self._col_ptr is not None and self._col_ptr[0] == width:
            return self._col_ptr[1]
        m, n = self.shape
        step = width // 8
        pc = reference._POPCOUNT.to(self.bitmask.device)[self.bitmask.to(torch.int32)]  # (m, nb) set bits per byte
        starts = [self.row_ptr[:-1].clone()]
        for c0 in range(width, n, width):
            starts.append(starts[-1] + pc[:, c0 // 8 - step : c0 // 8].sum(1, dtype=torch.int64))
        self._col_ptr = (width, starts)
        return starts

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_packed(cls, values: torch.Tensor, bitmask: torch.Tensor, shape, dtype: torch.dtype | None = None) -> "BitmaskMatrix":
        """From the saved ``(values (nnz,), bitmask)`` pair; ``dtype`` re-stores the values."""
        m, n = int(shape[0]), int(shape[1])
        if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (m, (n + 7) // 8):
            raise ValueError(f"bitmask of shape {tuple(bitmask.shape)} {bitmask.dtype} does not fit a {m}×{n} matrix")
        dtype = values.dtype if dtype is None else dtype
        if dtype not in VALUE_DTYPES:
            raise ValueError(f"bitmask values must be stored as one of {', '.join(str(d).removeprefix('torch.') for d in VALUE_DTYPES)}, not {dtype}")
        counts = reference.row_counts(bitmask, n)
        row_ptr = torch.zeros(m + 1, dtype=torch.int64, device=bitmask.device)
        torch.cumsum(counts, 0, out=row_ptr[1:])
        nnz = int(row_ptr[-1])
        if nnz != values.numel():
            raise ValueError(f"bitmask has {nnz} bits set but there are {values.numel()} values: the checkpoint is corrupt")
        padded = torch.zeros(nnz + PAD, dtype=dtype, device=values.device)
        padded[:nnz] = values
        return cls(padded, bitmask.contiguous(), row_ptr, (m, n))

    @classmethod
    def from_dense(cls, S: torch.Tensor, dtype: torch.dtype | None = None) -> "BitmaskMatrix":
        values, bitmask = reference.pack(S)
        return cls.from_packed(values, bitmask, S.shape, dtype)

    # ---------------------------------------------------------------- properties
    @property
    def nnz(self) -> int:
        return int(self.row_ptr[-1])

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"values": self.values, "bitmask": self.bitmask, "row_ptr": self.row_ptr}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: torch.device | str) -> "BitmaskMatrix":
        return BitmaskMatrix(self.values.to(device), self.bitmask.to(device), self.row_ptr.to(device), self.shape)

    # ---------------------------------------------------------------- products
    def dense(self, isa: str = "auto") -> torch.Tensor:
        """``S`` as a dense fp32 ``(m, n)`` matrix (a fresh tensor)."""
        ops = cpu_build.load() if self.device.type == "cpu" else None
        if ops is not None:
            return ops.unpack(self.values, self.bitmask, self.row_ptr, self.shape[1], _ISA[isa])
        tri = _triton() if self.device.type == "cuda" else None
        if tri is not None:
            return tri.unpack(self)
        return reference.unpack(self.values[: self.nnz], self.bitmask, self.shape).float()

    def linear_prefill(self, x: torch.Tensor, U: torch.Tensor | None = None, V: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None, chunk_bytes: int | None = None) -> torch.Tensor:
        """``x (S + U Vᵀ)ᵀ + bias`` for many tokens: the dense GEMM, on ``S`` unpacked a block of rows
        at a time — of columns when ``n > m``, accumulating into ``y``, so the wider operand ``x`` is
        read once — (≤ ``chunk_bytes``, into one reused per-thread buffer) with ``U Vᵀ`` added to the
        block — by the unpack itself, as it stores, up to rank :func:`fused_unpack_max_rank` (no second
        pass over the buffer), by one ``addmm`` beyond it — so no call allocates a dense matrix. CPU + fp32 with the compiled kernel; anywhere
        else one unpack of the whole ``S``."""
        m, n = self.shape
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, U, V, bias))
        ops = cpu_build.load() if x.device.type == "cpu" and x.dtype == torch.float32 and not grad else None
        if ops is None:
            W = self.dense().to(x.dtype)
            if U is not None:
                W.addmm_(U.to(x.dtype), V.t().to(x.dtype))
            return torch.nn.functional.linear(x, W, bias)
        x2 = x.reshape(-1, n)
        budget = chunk_bytes or PREFILL_CHUNK_BYTES
        rank = 0 if U is None else U.shape[1]
        fuse = 0 < rank <= fused_unpack_max_rank()
        # fp32 contiguous once here, not in the kernel once per block (its casts are then no-ops)
        U_f, Vt_f = (U.float().contiguous(), V.t().float().contiguous()) if fuse else (None, None)
        width = (budget // (4 * max(m, 1))) // 16 * 16
        if n > m and 16 <= width < n and hasattr(ops, "unpack_cols"):
            # wide (n > m): blocks of columns, y accumulated block by block, so x is read once (blocks of
            # rows would read all of x once per block: 1.29x dense at 1536 x 8960, 512 tokens, Zen 5)
            y = torch.empty(x2.shape[0], m, dtype=torch.float32)
            ws = _workspace(m * width)
            for b, c0 in enumerate(range(0, n, width)):
                c1 = min(n, c0 + width)
                Wc = ops.unpack_cols(self.values, self.bitmask, self.row_ptr, self.col_ptr(width)[b], n, c0, c1, ws[: m * (c1 - c0)].view(m, c1 - c0), 0,
                                     U_f, None if Vt_f is None else Vt_f[:, c0:c1].contiguous())
                if rank and not fuse:
                    Wc.addmm_(U, V[c0:c1].t())
                if c0 == 0:
                    torch.mm(x2[:, c0:c1], Wc.t(), out=y)
                else:
                    y.addmm_(x2[:, c0:c1], Wc.t())
            if bias is not None:
                y += bias
            return y.reshape(*x.shape[:-1], m)
        rows = max(1, min(m, budget // (4 * max(n, 1))))
        ws = _workspace(rows * n)
        y = torch.empty(x2.shape[0], m, dtype=torch.float32)
        for r0 in range(0, m, rows):
            r1 = min(m, r0 + rows)
            Wc = ops.unpack_rows(self.values, self.bitmask, self.row_ptr, n, r0, r1, ws[: (r1 - r0) * n].view(r1 - r0, n), 0, U_f, Vt_f)
            if rank and not fuse:
                Wc.addmm_(U[r0:r1], V.t())
            torch.mm(x2, Wc.t(), out=y[:, r0:r1] if rows < m else y)
        if bias is not None:
            y += bias
        return y.reshape(*x.shape[:-1], m)

    def matmul(self, x: torch.Tensor, isa: str = "auto", U: torch.Tensor | None = None, V: torch.Tensor | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x Sᵀ (+ (x V) Uᵀ) (+ bias)`` for ``x (..., n)`` → ``(..., m)`` in ``x``'s dtype (fp32
        accumulation). With ``U (m, r)``, ``V (n, r)`` and/or ``bias`` the CPU kernel does the whole
        low-rank + sparse layer in one call."""
        m, n = self.shape
        if x.shape[-1] != n:
            raise ValueError(f"x has {x.shape[-1]} features, the matrix takes {n}")
        x2 = x.reshape(-1, n)
        if x.device.type == "cpu" and (ops := cpu_build.load()) is not None:  # one call, whatever of U, V, bias is given
            y = ops.spmv_fused(x2, self.values, self.bitmask, self.row_ptr, U, V, bias, _ISA[isa])
            return (y if x.dtype == torch.float32 else y.to(x.dtype)).view(*x.shape[:-1], m)
        if x.device.type == "cuda" and (tri := _triton()) is not None:
            y = tri.spmv(x2, self)
        else:
            y = x2.float() @ self.dense().t()
        if U is not None:
            y = y + (x2.float() @ V.float()) @ U.float().t()
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], m)
