"""The allocation guard: the global allocation is checked against the uniform one before it is applied.

CAP's global ranking compares second-order scores of candidates in different layers; where those
scores do not carry across layers (Gemma-3-270M at 50 %: the last blocks kept 18–24 % of their
parameters and the model came out 1.41× worse than SparseGPT, issue 13) the allocation itself is
what loses. The guard measures both candidate models on calibration windows that no statistic
has seen (:attr:`capllm.data.calibration.CalibrationSet.held_out`):

    ℓ(keep) = (1 / N) Σ_w Σ_t −log p(x_{t+1} | x_≤t ; W̃(keep))

with every decoder linear set to ``W̃ = U' diag(σ') V'ᵀ + S'`` — the Stage 1 values of the
kept directions and entries, before the refit (:func:`masked_loss`) — for the global mask and
for the uniform split (each matrix ``⌊(1 − ρ) m n⌋``, the same scores: ``cap-uniform``), and
keeps the global one unless the uniform one's loss is lower. Both losses and the choice are in
``result.json`` (``method_results.guard``).

The loss runs block by block like every pass (one block on the device, the windows' hidden
states on CPU, the head on 128 tokens at a time); the model's weights are swapped for ``W̃`` only
while their block runs and are bit-for-bit the same afterwards.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from capllm.allocate.refit import Decision


def _dense(d: Decision, shape: tuple[int, int]) -> torch.Tensor:
    W = torch.zeros(shape, dtype=torch.float32) if d.S is None else d.S.float().clone()
    if d.U is not None:
        W += d.U.float() @ d.V.float().t()
    return W


@torch.no_grad()
def masked_loss(ctx, decide: Callable[[str], Decision], windows: torch.Tensor) -> float:
    """Mean next-token NLL of ``windows`` with every linear at its decision's ``W̃`` (module docstring)."""
    from capllm.engine.capture import block_to, capture_block_inputs, cast_floats, release_block, stored_dtype
    from capllm.engine.head import Head
    from capllm.engine.layerwise import place_outside_blocks
    from capllm.models.layers import find_decoder_blocks

    model, device, compute = ctx.model, ctx.device, ctx.compute_dtype
    cpu = torch.device("cpu")
    _, blocks = find_decoder_blocks(model)
    by_block: dict[int, list] = {}
    for h in ctx.linears:
        by_block.setdefault(h.block_index, []).append(h)
    was_training = model.training
    model.eval()
    place_outside_blocks(model, device)
    captured = capture_block_inputs(model, blocks, windows, device, cpu)
    hidden = [x.to(compute) for x in captured.hidden]
    for i, block in enumerate(blocks):
        keep_dtype = stored_dtype(block)
        block_to(block, device, compute)
        originals = []
        for h in by_block.get(i, []):
            p = h.module.weight
            W = _dense(decide(h.name), h.shape).to(device=p.device, dtype=p.dtype)
            originals.append((p, p.data))
            p.data = W.t().contiguous() if h.conv1d else W
        try:
            args, kwargs = captured.per_block[i]
            for s in range(len(hidden)):
                out = block(hidden[s].to(device), *cast_floats(args[s], device, compute), **cast_floats(kwargs[s], device, compute))
                hidden[s] = (out[0] if isinstance(out, (tuple, list)) else out).to(cpu)
        finally:
            for p, data in originals:
                p.data = data
        block_to(block, cpu, keep_dtype)
        release_block(block)
    head = Head(model, device)
    total = sum(float(head.loss(h.to(device), windows[s], chunk=128).double()) for s, h in enumerate(hidden))
    model.to(cpu)
    model.train(was_training)
    loss = total / (windows.shape[0] * (windows.shape[1] - 1))
    if not math.isfinite(loss):
        raise RuntimeError("the allocation guard's loss is not finite")
    return loss
