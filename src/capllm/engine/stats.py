"""Running statistics of a linear layer's inputs, accumulated batch by batch.

For inputs ``x ∈ R^n`` (all tokens of all calibration windows) :class:`InputStats` keeps running
means, so the result does not depend on how tokens are batched:

* ``sq``: ``E[x_j²]`` — Wanda's ``‖X_j‖²/N``, OATS's ``D² = diag(E x_j²)``;
* ``abs``: ``E|x_j|`` — ASVD's activation scale;
* ``gram``: ``E[x xᵀ]`` — SparseGPT's ``H = 2XXᵀ/N`` up to the factor 2 (which no method's
  result depends on), SVD-LLM's ``XXᵀ``.

Accumulation is in fp32 on the layer's device, or fp64 when asked (``gram_dtype``).
"""

from __future__ import annotations

import torch


class InputStats:
    def __init__(self, n_in: int, device: torch.device, sq: bool = True, abs_mean: bool = False, gram: bool = False, gram_dtype: torch.dtype = torch.float32) -> None:
        self.n_in = n_in
        self.tokens = 0
        self.sq = torch.zeros(n_in, device=device, dtype=torch.float64) if sq else None
        self.abs = torch.zeros(n_in, device=device, dtype=torch.float64) if abs_mean else None
        self.gram = torch.zeros(n_in, n_in, device=device, dtype=gram_dtype) if gram else None

    def add_batch(self, inp: torch.Tensor) -> None:
        x = inp.reshape(-1, inp.shape[-1])
        t = x.shape[0]
        if t == 0:
            return
        total = self.tokens + t
        keep, new = self.tokens / total, 1.0 / total
        xf = x.float()
        if self.sq is not None:
            self.sq.mul_(keep).add_(xf.pow(2).sum(0).double(), alpha=new)
        if self.abs is not None:
            self.abs.mul_(keep).add_(xf.abs().sum(0).double(), alpha=new)
        if self.gram is not None:
            xg = x.to(self.gram.dtype)
            self.gram.mul_(keep).addmm_(xg.t(), xg, alpha=new)
        self.tokens = total

    def reduce(self, dist) -> None:
        """Combine the running means of every rank (:func:`capllm.engine.distributed.reduce_means`):
        afterwards each rank holds the moments over all ranks' tokens."""
        from capllm.engine.distributed import reduce_means

        self.tokens = reduce_means(dist, self.tokens, [self.sq, self.abs, self.gram])

    def free(self) -> None:
        self.sq = self.abs = self.gram = None
