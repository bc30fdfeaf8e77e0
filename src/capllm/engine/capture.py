"""Capture the inputs of the first decoder block: hidden states *and* every other argument.

The decoder blocks are swapped for recorders that store the positional and keyword arguments
the model passes each of them (attention mask, position ids and embeddings, cache position, ...)
and stop the forward pass at the last one. Each block is then called with exactly its own arguments, so the engine works for any
architecture — no per-model glue.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


def cast_floats(obj, device: torch.device, dtype: torch.dtype):
    """``to_device`` that also casts floating tensors to the block's compute dtype."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, dtype) if obj.is_floating_point() else obj.to(device)
    if isinstance(obj, tuple):
        return tuple(cast_floats(o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [cast_floats(o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: cast_floats(v, device, dtype) for k, v in obj.items()}
    return obj


def stored_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a module's floating parameters are held in (fp32 if it has none)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def block_to(block: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """``block.to(device, dtype)``; when that makes new tensors, the pages the old ones held in
    the checkpoint's memory map are released (:func:`capllm.utils.release_host_pages`), so a
    block's round trip through the device never leaves two host copies of its weights."""
    from capllm.utils import release_host_pages

    old = [p.data for p in block.parameters() if p.device.type == "cpu" and (torch.device(device).type != "cpu" or (p.is_floating_point() and p.dtype != dtype))]
    block.to(device, dtype)
    if old:
        release_host_pages(old)


def release_block(block: nn.Module) -> int:
    """After a pass is done with a block: drop its checkpoint pages that were only read (they
    come back from the file if needed again), so a pass over the model holds one block."""
    from capllm.utils import release_host_pages

    return release_host_pages([p.data for p in block.parameters()], clean_only=True)


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


@dataclass
class CapturedInputs(BlockInputs):
    """Block 0's inputs (``hidden``, ``args``, ``kwargs``) and the other arguments of *every*
    block: blocks of one model need not be called alike (Gemma 3 gives its sliding-window
    layers a different mask and rotary table than its global ones)."""

    per_block: list[tuple[list[tuple], list[dict]]] = field(default_factory=list)

    def for_block(self, i: int, hidden: list[torch.Tensor]) -> BlockInputs:
        args, kwargs = self.per_block[i]
        return BlockInputs(hidden, args, kwargs)


def _drop_cache(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    for k in ("past_key_value", "past_key_values", "layer_past", "cache"):
        if k in kwargs:
            kwargs[k] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return kwargs


_SIMPLE = (bool, int, float, str, type(None))


def copy_simple_attributes(src: nn.Module, dst: nn.Module) -> None:
    """Give a stand-in the plain attributes of the block it replaces, which the model may read
    while calling its blocks (``attention_type``, ``layer_idx``, ``is_sliding``, ...)."""
    for k, v in vars(src).items():
        if not k.startswith("_") and k != "training" and isinstance(v, _SIMPLE):
            setattr(dst, k, v)


class _Recorder(nn.Module):
    """Stands in for one decoder block: records what the model calls it with, returns its input."""

    def __init__(self, like: nn.Module, record, last: bool) -> None:
        super().__init__()
        copy_simple_attributes(like, self)
        self._record, self._last = record, last

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self._record(hidden, tuple(args[1:]), kwargs)
        if self._last:
            raise _Stop
        return hidden


class _Dedup:
    """Store identical argument sets once (the usual case: every window and most blocks alike)."""

    def __init__(self) -> None:
        self.seen: list[tuple[tuple, dict]] = []

    def __call__(self, rest: tuple, kw: dict) -> tuple[tuple, dict]:
        for a, k in self.seen:
            if _same(k, kw) and _same(a, rest):
                return a, k
        self.seen.append((rest, kw))
        return rest, kw


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, windows: torch.Tensor, device: torch.device, storage: torch.device = torch.device("cpu")) -> CapturedInputs:
    """Run ``model`` on each window with its blocks replaced by recorders; keep what each block
    would have received (hidden states for block 0 only, the other arguments for every block).

    Only the parts of the model outside the blocks run (embeddings, rotary tables, masks), and
    the forward stops at the last block, before the head. Identical argument sets across windows
    and blocks are stored once and shared.
    """
    nb = len(blocks)
    captured = CapturedInputs([], [], [], [([], []) for _ in range(nb)])
    dedup = _Dedup()
    pos = {"block": 0}

    def record(hidden, rest, kwargs):
        i = pos["block"]
        rest, kw = dedup(to_device(rest, storage), to_device(_drop_cache(kwargs), storage))
        if i == 0:
            captured.hidden.append(hidden.detach().to(storage))
        captured.per_block[i][0].append(rest)
        captured.per_block[i][1].append(kw)
        pos["block"] = i + 1

    parent_name, child = _blocks_parent(model, blocks)
    parent = model.get_submodule(parent_name) if parent_name else model
    stand_ins = nn.ModuleList(_Recorder(b, record, last=(j == nb - 1)) for j, b in enumerate(blocks))
    setattr(parent, child, stand_ins)
    try:
        for w in windows:
            pos["block"] = 0
            try:
                model(w.unsqueeze(0).to(device), use_cache=False)
            except _Stop:
                pass
            if pos["block"] != nb:
                raise RuntimeError(f"the model called {pos['block']} of its {nb} decoder blocks for one window")
    finally:
        setattr(parent, child, blocks)
    if len(captured.hidden) != len(windows):
        raise RuntimeError(f"captured {len(captured.hidden)} block inputs for {len(windows)} windows")
    captured.args, captured.kwargs = captured.per_block[0]
    return captured


def _blocks_parent(model: nn.Module, blocks: nn.ModuleList) -> tuple[str, str]:
    for name, mod in model.named_modules():
        if mod is blocks:
            parent, _, child = name.rpartition(".")
            return parent, child
    raise RuntimeError("the decoder blocks are not a submodule of the model")
