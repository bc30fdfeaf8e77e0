"""Block-wise backward pass: output-gradient statistics of every decoder linear, one block at a time.

With the decoder blocks ``h_{i+1} = f_i(h_i)`` (``i = 0 … L−1``; ``h_0`` the embeddings as block 0
receives them) and the summed next-token cross-entropy over the calibration windows

    ℒ = Σ_w ℓ(head(h_L^w)),

the statistic of a linear with output ``y`` (``m`` features) is

    G_j = (1/N) Σ_w Σ_t (∂ℒ/∂y_{w,t,j})²,      N = nwin · (L_tok − 1) predicted tokens,

the diagonal of the output factor of the K-FAC / empirical-Fisher approximation. Backpropagating
through the whole model needs all of it on the device at once; instead, by the chain rule,

1. ``δ_L = ∂ℒ/∂h_L`` per window from the head alone (:class:`capllm.engine.head.Head`);
2. for ``i = L−1 … 0``: put block ``i`` on the device, and per window recompute
   ``f_i(h_i)`` from its stored input with ``h_i.requires_grad``, backpropagate ``δ_{i+1}``
   through it (a vector–Jacobian product). Hooks on the linears' outputs see ``g = ∂ℒ/∂y``
   (``y`` affects ``ℒ`` only through ``h_{i+1}``) and add ``Σ_t g²`` per feature in float64;
   the gradient reaching the input is ``δ_i = ∂ℒ/∂h_i``, kept on CPU for the next block down.

Optionally (``on_entry_stats``) the same hooks also form each linear's per-entry diagonal
empirical Fisher ``F_ij = Σ_t g_ti² x_tj²`` (``x`` the linear's input): one ``(m, T)·(T, n)``
matmul per window, the cost of a weight gradient, handed out block by block.

This is exact — the same numbers as whole-model autograd up to float rounding. Only one block
and one window's tensors are on the device; ``δ`` for all windows (one block's worth) is on CPU;
no parameter gradient is ever formed. Blocks run in eval mode (dropout off), so recomputation
reproduces the forward pass.

Resume: after each block ``on_block_done(state)`` receives a :class:`BackwardState`; passing a
saved one as ``start`` continues below its block. :class:`DiskCheckpoint` does both with one file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from capllm.engine.capture import BlockInputs, block_to, cast_floats, release_block, stored_dtype
from capllm.engine.head import Head
from capllm.models.layers import LinearHandle, find_decoder_blocks, find_linears


@dataclass
class BackwardState:
    """Progress of the backward pass: blocks ``> block`` are done.

    ``delta[w] = ∂ℒ/∂(output of block `block`)`` for window ``w`` (CPU); ``sums`` the float64
    ``Σ g²`` of the finished blocks' linears; ``loss`` = ``ℒ``; ``block = −1`` when finished.
    """

    block: int
    delta: list[torch.Tensor]
    sums: dict[str, torch.Tensor]
    loss: float


class DiskCheckpoint:
    """``start`` / ``on_block_done`` through one file, written atomically (``torch.save`` + rename)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def load(self) -> BackwardState | None:
        if not self.path.exists():
            return None
        d = torch.load(self.path, map_location="cpu", weights_only=True)
        return BackwardState(int(d["block"]), list(d["delta"]), dict(d["sums"]), float(d["loss"]))

    def __call__(self, state: BackwardState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({"block": state.block, "delta": state.delta, "sums": state.sums, "loss": state.loss}, tmp)
        os.replace(tmp, self.path)


def _head_deltas(head: Head, final_hidden: Sequence[torch.Tensor], windows: torch.Tensor) -> tuple[list[torch.Tensor], float]:
    deltas, total = [], 0.0
    for h, ids in zip(final_hidden, windows):
        loss, g = head.loss_and_grad(h, ids)
        deltas.append(g.cpu())
        total += loss
    return deltas, total


def _block_vjp(block: nn.Module, inputs: BlockInputs, delta: list[torch.Tensor], handles: list[LinearHandle], device: torch.device,
               dtype: torch.dtype, entries: bool = False) -> tuple[list[torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One block: ``(δ_i per window, {name: Σ g²}, {name: Σ_t g_t² x_tᵀ²}``) from ``δ_{i+1}``; the
    last only with ``entries`` (else empty); block already on ``device``."""
    sums = {h.name: torch.zeros(h.shape[0], dtype=torch.float64, device=device) for h in handles}
    ent = {h.name: torch.zeros(h.shape, dtype=torch.float32, device=device) for h in handles} if entries else {}

    def hook(name):
        seen: dict[str, torch.Tensor] = {}

        def add(g):
            g2 = g.detach().reshape(-1, g.shape[-1]).double().pow(2)
            sums[name].add_(g2.sum(0))
            if entries:  # the entries' diagonal empirical Fisher: Σ_t g_ti² x_tj², one matmul
                x2 = seen.pop("x").reshape(g2.shape[0], -1).float().pow(2)
                ent[name].addmm_(g2.float().T, x2)

        def fn(mod, inp, out):
            if isinstance(out, torch.Tensor) and out.requires_grad:
                if entries:
                    seen["x"] = inp[0].detach()
                out.register_hook(add)
        return fn

    hooks = [h.module.register_forward_hook(hook(h.name)) for h in handles]
    new_delta = []
    try:
        with torch.enable_grad():
            for s, d in enumerate(delta):
                x = inputs.hidden[s].detach().to(device, dtype).requires_grad_(True)
                out = block(x, *cast_floats(inputs.args[s], device, dtype), **cast_floats(inputs.kwargs[s], device, dtype))
                out = out[0] if isinstance(out, (tuple, list)) else out
                (gx,) = torch.autograd.grad(out, x, grad_outputs=d.to(device=device, dtype=out.dtype))
                new_delta.append(gx.cpu())
                del x, out, gx
    finally:
        for hk in hooks:
            hk.remove()
    return new_delta, {k: v.cpu() for k, v in sums.items()}, {k: v.cpu() for k, v in ent.items()}


def blockwise_output_grad_sq(
    model: nn.Module,
    block_inputs: Callable[[int], BlockInputs],
    final_hidden: Sequence[torch.Tensor],
    windows: torch.Tensor,
    device: torch.device | str,
    linears: Sequence[LinearHandle] | None = None,
    *,
    head: Head | None = None,
    start: BackwardState | None = None,
    on_block_done: Callable[[BackwardState], None] | None = None,
    progress: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    on_entry_stats: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
) -> dict[str, torch.Tensor]:
    """``{linear name: G (m,) float32}``, ``G_j = E_tokens[(∂ℒ/∂y_j)²]``, block by block (module doc).

    ``block_inputs(i)``: the stored inputs of block ``i`` for every window (hidden states and the
    other args / kwargs it is called with, e.g. from :func:`capture_block_inputs` and forward
    replay; CPU or anywhere). ``final_hidden[w]``: output ``(1, L, d)`` of the last block for
    window ``windows[w]`` (token ids, ``(nwin, L)``). ``linears``: the linears to measure (default:
    all of the decoder). The non-block parts of the model must already be on ``device``
    (``place_outside_blocks``); each block is moved there in turn and back to where it was.
    ``head``: reuse a :class:`Head` (default: a new one). ``start`` / ``on_block_done``: resume
    (see :class:`BackwardState`, :class:`DiskCheckpoint`). Each block runs in ``compute_dtype``.
    ``on_entry_stats(i, {name: F})``: also the per-entry diagonal empirical Fisher of block ``i``'s
    linears, ``F_ij = Σ_w Σ_t g_ti² x_tj²`` (``(m, n)`` float32, a sum: divide by the token count),
    handed over block by block (before ``on_block_done``) so that no more than one block of it is
    ever in memory.
    """
    device = torch.device(device)
    _, blocks = find_decoder_blocks(model)
    linears = list(find_linears(model) if linears is None else linears)
    by_block: dict[int, list[LinearHandle]] = {}
    for h in linears:
        by_block.setdefault(h.block_index, []).append(h)
    if len(final_hidden) != len(windows):
        raise ValueError(f"{len(final_hidden)} final hidden states for {len(windows)} windows")
    count = len(windows) * (windows.shape[1] - 1)

    was_training = model.training
    grad_flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    try:
        if start is None:
            delta, loss = _head_deltas(head or Head(model, device), final_hidden, windows)
            state = BackwardState(len(blocks) - 1, delta, {}, loss)
        else:
            state = BackwardState(start.block, list(start.delta), dict(start.sums), start.loss)
        for i in tqdm(range(state.block, -1, -1), desc="CAP fisher: backward blocks", unit="block", disable=not progress):
            block = blocks[i]
            home, home_dtype = next(block.parameters()).device, stored_dtype(block)
            block_to(block, device, compute_dtype)  # computed in compute_dtype, kept in the dtype it is stored in
            try:
                delta, sums, ent = _block_vjp(block, block_inputs(i), state.delta, by_block.get(i, []), device, compute_dtype,
                                              entries=on_entry_stats is not None)
            finally:
                block_to(block, home, home_dtype)
                release_block(block)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if on_entry_stats is not None:
                on_entry_stats(i, ent)
            del ent
            state = BackwardState(i - 1, delta, {**state.sums, **sums}, state.loss)
            if on_block_done is not None:
                on_block_done(state)
    finally:
        for p, r in zip(model.parameters(), grad_flags):
            p.requires_grad_(r)
        model.train(was_training)
    missing = [h.name for h in linears if h.name not in state.sums]
    if missing:
        raise RuntimeError(f"no gradient statistics for {len(missing)} linears, e.g. {missing[0]}")
    return {h.name: (state.sums[h.name] / count).float() for h in linears}
