"""Pure-torch packing and unpacking of the bitmask layout: the fallback of every kernel, and the
independent computation the kernels are tested against.

The bit convention (bit ``j % 8``, least significant first, of byte ``j // 8`` in row ``i`` set iff
``S[i, j] != 0``) is the one written by :func:`capllm.format.bitmask.pack_bitmask` and read by the
``modeling_capllm.py`` shipped with each saved model; this file repeats it without importing
``format`` (kernels sit below it).
"""

from __future__ import annotations

import torch

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def mask_of(bitmask: torch.Tensor, n: int) -> torch.Tensor:
    """``(m, ceil(n/8)) uint8`` → ``(m, n)`` bool."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :n].bool()


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)


def row_counts(bitmask: torch.Tensor, n: int) -> torch.Tensor:
    """Non-zeros per row, ``(m,) int64``, from the mask's bits (columns ≥ n ignored): a popcount
    table lookup per byte, so no ``(m, n)`` temporary."""
    b = bitmask
    if n % 8 and b.shape[1]:
        b = b.clone()
        b[:, -1] &= (1 << (n % 8)) - 1
    return _POPCOUNT.to(b.device)[b.to(torch.int32)].sum(1, dtype=torch.int64)


def pack(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``S (m, n)`` → ``(values (nnz,), bitmask (m, ceil(n/8)) uint8)``."""
    m, n = S.shape
    mask = S != 0
    nb = (n + 7) // 8
    padded = torch.zeros(m, nb * 8, dtype=torch.uint8, device=S.device)
    padded[:, :n] = mask
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=S.device)
    bitmask = (padded.view(m, nb, 8) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)
    return S[mask].contiguous(), bitmask


def unpack(values: torch.Tensor, bitmask: torch.Tensor, shape) -> torch.Tensor:
    """Dense ``(m, n)`` in ``values``' dtype."""
    m, n = int(shape[0]), int(shape[1])
    mask = mask_of(bitmask, n)
    return torch.zeros(m, n, dtype=values.dtype, device=values.device).masked_scatter_(mask, values)
