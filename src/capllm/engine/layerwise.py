"""The layer-wise pipeline every layer-wise method runs through (DESIGN §3).

1. capture the inputs of block 0 for every calibration window (:mod:`capllm.engine.capture`);
2. for each block, on the compute device:
   a. hook every linear and feed its inputs to the method's ``LayerCompressor.add_batch``
      while the block runs on the (already compressed-upstream) inputs;
   b. ``compress`` each linear and write the result into the model;
   c. re-run the compressed block so the next block sees compressed outputs;
3. activations live on CPU between blocks; only the current block sits on the device.

Methods that need no calibration data skip the forward passes entirely.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from capllm.engine.capture import capture_block_inputs, to_device
from capllm.errors import CapllmError
from capllm.models.layers import find_decoder_blocks

if TYPE_CHECKING:
    from capllm.engine.context import CompressionContext
    from capllm.methods.base import Method


@contextlib.contextmanager
def blocks_detached(model: nn.Module, path: str) -> Iterator[None]:
    """Temporarily take the decoder ModuleList out of ``model`` (to move the rest on its own)."""
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    blocks = getattr(parent, child)
    setattr(parent, child, nn.ModuleList())
    try:
        yield
    finally:
        setattr(parent, child, blocks)


def place_outside_blocks(model: nn.Module, device: torch.device) -> None:
    """Put embeddings, final norm and head on ``device``; leave the blocks where they are."""
    path, _ = find_decoder_blocks(model)
    with blocks_detached(model, path):
        model.to(device)


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_finite(t: torch.Tensor, where: str) -> None:
    if not torch.isfinite(t).all():
        raise CapllmError(f"non-finite activations after {where}: the model or its compression produced NaN/Inf")


@torch.no_grad()
def run_layerwise(ctx: "CompressionContext", method: "Method") -> None:
    model, device = ctx.model, ctx.device
    path, blocks = find_decoder_blocks(model)
    by_block: dict[int, list] = {}
    for h in ctx.linears:
        by_block.setdefault(h.block_index, []).append(h)

    if not method.needs_calibration:
        for h in tqdm(ctx.linears, desc=f"{method.name}: layers", disable=not ctx.progress):
            comp = method.layer_compressor(h)
            ctx.apply(h, comp.compress(h.weight_copy()))
            comp.free()
        return

    if ctx.calibration is None:
        raise CapllmError(f"method {method.name} needs calibration data")
    storage = torch.device("cpu")
    with ctx.timer.stage("capture"):
        place_outside_blocks(model, device)
        inputs = capture_block_inputs(model, blocks, ctx.calibration.windows, device, storage)
    n = len(inputs.hidden)

    for i, block in enumerate(tqdm(blocks, desc=f"{method.name}: blocks", disable=not ctx.progress)):
        block.to(device)
        handles = by_block.get(i, [])
        comps = {h.name: method.layer_compressor(h) for h in handles}
        hooks = [
            h.module.register_forward_hook(lambda mod, inp, out, c=comps[h.name]: c.add_batch(inp[0].detach(), out.detach()))
            for h in handles
        ]
        try:
            for s in range(n):
                block(inputs.hidden[s].to(device), *to_device(inputs.args[s], device), **to_device(inputs.kwargs[s], device))
        finally:
            for hk in hooks:
                hk.remove()
        for h in handles:
            cw = comps[h.name].compress(h.weight_copy())
            comps[h.name].free()
            ctx.apply(h, cw)
        del comps
        for s in range(n):
            out = _block_output(block(inputs.hidden[s].to(device), *to_device(inputs.args[s], device), **to_device(inputs.kwargs[s], device)))
            _check_finite(out, f"block {i}")
            inputs.hidden[s] = out.to(storage)
        block.to(storage)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    model.to(storage)
