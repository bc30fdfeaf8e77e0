"""The values + packed-bitmask storage of a sparse matrix (the layout idea of compressed-tensors'
``sparse-bitmask``; our own implementation).

A ``(m, n)`` matrix ``S`` with ``nnz`` non-zeros is stored as

* ``values (nnz,)``: the non-zeros in row-major order, in ``S``'s dtype;
* ``bitmask (m, ceil(n/8)) uint8``: bit ``j % 8`` (least significant first) of byte ``j // 8``
  of row ``i`` is set iff ``S[i, j] != 0``.

Bytes: ``nnz · itemsize + m · ceil(n/8)`` against ``m · n · itemsize`` dense, so at 50 % density
in fp32 the packed form takes 53.1 % of the dense bytes; the bitmask (the index overhead) is
1/32 of the dense fp32 bytes whatever the density. Packing pays while the density is below
``1 − 1/(8 · itemsize)`` (96.9 % in fp32, 93.8 % in fp16/bf16). Unpacking lives in
:mod:`capllm.format.modeling_capllm` (the file that ships with every saved model).
"""

from __future__ import annotations

import torch

from capllm.format.modeling_capllm import unpack_bitmask, unpack_mask
from capllm.format.modules import make_csr

__all__ = ["pack_bitmask", "packed_bytes", "packing_pays", "unpack_bitmask", "unpack_mask", "csr_from_bitmask"]

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bitmask(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``S (m, n)`` → ``(values (nnz,), bitmask (m, ceil(n/8)) uint8)``."""
    m, n = S.shape
    mask = S != 0
    values = S[mask].contiguous()
    nb = (n + 7) // 8
    padded = torch.zeros(m, nb * 8, dtype=torch.uint8, device=S.device)
    padded[:, :n] = mask
    bitmask = (padded.view(m, nb, 8) * _BIT_WEIGHTS.to(S.device)).sum(-1, dtype=torch.int32).to(torch.uint8)
    return values, bitmask


def packed_bytes(m: int, n: int, nnz: int, itemsize: int) -> int:
    return nnz * itemsize + m * ((n + 7) // 8)


def packing_pays(m: int, n: int, nnz: int, itemsize: int) -> bool:
    return packed_bytes(m, n, nnz, itemsize) < m * n * itemsize


def csr_from_bitmask(values: torch.Tensor, bitmask: torch.Tensor, shape, index_dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """CSR ``(m, n)`` straight from the packed form: the values are already in CSR order."""
    m, n = int(shape[0]), int(shape[1])
    mask = unpack_mask(bitmask, n)
    if int(mask.sum()) != values.numel():
        raise ValueError("bitmask and values disagree: the checkpoint is corrupt")
    crow = torch.zeros(m + 1, dtype=torch.int64, device=values.device)
    crow[1:] = mask.sum(1).cumsum(0)
    col = mask.nonzero()[:, 1]
    return make_csr(crow, col, values, (m, n), index_dtype)
