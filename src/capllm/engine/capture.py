"""Capture the inputs of the first decoder block: hidden states *and* every other argument.

A forward pre-hook (``with_kwargs=True``) on block 0 stores the positional and keyword arguments
the model passes (attention mask, position ids and embeddings, cache position, ...) and stops
the forward pass. Blocks are then called with exactly these arguments, so the engine works for
any architecture whose blocks are called with the same arguments — no per-model glue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class _Stop(Exception):
    pass


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor inside nested tuples / lists / dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b)


@dataclass
class BlockInputs:
    """Per calibration window: the block's hidden-state input, other args, kwargs (on ``storage``)."""

    hidden: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict]


def _drop_cache(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    for k in ("past_key_value", "past_key_values", "layer_past"):
        if k in kwargs:
            kwargs[k] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return kwargs


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, device: torch.device, storage: torch.device = torch.device("cpu")) -> BlockInputs:
    """Run ``model`` on each window until block 0 and keep what block 0 would have received.

    Identical non-hidden arguments across windows (the usual case: same length, no padding) are
    stored once and shared.
    """
    captured = BlockInputs([], [], [])

    def hook(module, args, kwargs):
        hidden, rest = args[0] if args else kwargs.pop("hidden_states"), tuple(args[1:])
        kw = _drop_cache(kwargs)
        rest, kw = to_device(rest, storage), to_device(kw, storage)
        if captured.kwargs and _same(kw, captured.kwargs[-1]) and _same(rest, captured.args[-1]):
            rest, kw = captured.args[-1], captured.kwargs[-1]
        captured.hidden.append(hidden.detach().to(storage))
        captured.args.append(rest)
        captured.kwargs.append(kw)
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for w in windows:
            try:
                model(w.unsqueeze(0).to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(captured.hidden) != len(windows):
        raise RuntimeError(f"captured {len(captured.hidden)} block inputs for {len(windows)} windows")
    return captured
