"""The allocation guard: the global allocation is checked against the uniform one before it is applied.

CAP's global ranking compares second-order scores of candidates in different layers; where those
scores do not carry across layers (Gemma-3-270M at 50 %: the last blocks kept 18–24 % of their
parameters and the model came out 1.41× worse than SparseGPT, issue 13) the allocation itself is
what loses. The guard measures both candidate models on calibration windows that no statistic
has seen (:attr:`capllm.data.calibration.CalibrationSet.held_out`):

    ℓ(keep) = (1 / N) Σ_w Σ_t −log p(x_{t+1} | x_≤t ; W̃(keep))

with every decoder linear set to ``W̃ = U' diag(σ') V'ᵀ + S'`` — the Stage 1 values of the
kept directions and entries, before the refit (:func:`masked_loss`) — for the global mask and
for each alternative: the uniform split (each matrix ``⌊(1 − ρ) m n⌋``, the same scores:
``cap-uniform``), the ranking inside each block (``block``), and the mixes ``mixα`` (each matrix's
count ``(1 − α) n_uniform + α n_global``, filled by its own keys) — and keeps the global one unless
an alternative's loss is lower. The default (``guard=auto``) checks ``uniform`` and ``mix0.25``,
``mix0.5``, ``mix0.75``: on both models measured the best allocation is an interior mix, below
both ends. Every loss and the choice are in ``result.json`` (``method_results.guard``).

The loss is the block-wise evaluator's (:func:`capllm.eval.perplexity.blockwise_window_nll`: one
block on the device, the windows' hidden states on CPU, the head on 128 tokens at a time); the
model's weights are swapped for ``W̃`` only while their block runs and are bit-for-bit the same
afterwards.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch

from capllm.allocate.refit import Decision


@torch.no_grad()
def masked_loss(ctx, decide: Callable[[str], Decision], windows: torch.Tensor, blocks: set[int] | None = None, **resume) -> float:
    """Mean next-token NLL of ``windows`` with every linear at its decision's ``W̃`` (module docstring);
    with ``blocks``, only the linears of those decoder blocks (the others keep their weights).
    ``resume``: ``start`` / ``start_hidden`` / ``on_block_input`` of :func:`~capllm.eval.perplexity.blockwise_window_nll`."""
    from capllm.eval.perplexity import blockwise_window_nll

    by_block: dict[int, list] = {}
    for h in ctx.linears:
        if blocks is None or h.block_index in blocks:
            by_block.setdefault(h.block_index, []).append(h)

    @contextlib.contextmanager
    def substituted(i, block):
        originals = []
        try:
            for h in by_block.get(i, []):
                p = h.module.weight
                W = decide(h.name).dense().to(device=p.device, dtype=p.dtype)
                originals.append((p, p.data))
                p.data = W.t().contiguous() if h.conv1d else W
            yield
        finally:
            for p, data in originals:
                p.data = data

    was_training = ctx.model.training
    ctx.model.eval()
    try:
        sums = blockwise_window_nll(ctx.model, windows, ctx.device, ctx.compute_dtype, around_block=substituted, **resume)
    finally:
        ctx.model.train(was_training)
    loss = float(sums.sum()) / (windows.shape[0] * (windows.shape[1] - 1))
    if not math.isfinite(loss):
        raise RuntimeError("the allocation guard's loss is not finite")
    return loss
