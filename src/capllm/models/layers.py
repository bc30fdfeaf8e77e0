"""Architecture-agnostic discovery of decoder blocks and their linear layers.

The decoder stack is the ``nn.ModuleList`` with the most parameters whose length equals the
config's layer count (``model.model.layers`` for LLaMA/Qwen2/Mistral/Gemma, ``transformer.h`` for
GPT-2, ``model.decoder.layers`` for OPT, ``gpt_neox.layers`` for GPT-NeoX). Inside each block every
``nn.Linear`` and GPT-2 ``Conv1D`` is a compression target. :class:`LinearHandle` hides the
Conv1D transpose: ``weight()`` is always ``(out, in)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from capllm.errors import CapllmError


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


@dataclass
class LinearHandle:
    """A compressible linear layer: ``name`` is its full module path in the model."""

    name: str
    module: nn.Module
    block_index: int
    local_name: str  # path inside the block, e.g. "self_attn.q_proj"

    @property
    def conv1d(self) -> bool:
        return _is_conv1d(self.module)

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``."""
        w = self.module.weight
        return (w.shape[1], w.shape[0]) if self.conv1d else (w.shape[0], w.shape[1])

    @property
    def numel(self) -> int:
        m, n = self.shape
        return m * n

    def weight(self) -> torch.Tensor:
        """The weight as ``(out, in)`` (a view; transpose for Conv1D)."""
        w = self.module.weight.data
        return w.t() if self.conv1d else w

    def weight_copy(self) -> torch.Tensor:
        """A contiguous fp32 copy of the ``(out, in)`` weight, safe to modify."""
        return self.weight().to(torch.float32, memory_format=torch.contiguous_format, copy=True)

    def set_weight(self, w: torch.Tensor) -> None:
        """Write an ``(out, in)`` weight back in the module's own layout and dtype."""
        p = self.module.weight
        new = (w.t() if self.conv1d else w).to(dtype=p.dtype, device=p.device)
        p.data.copy_(new)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)


def _num_layers(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(text_cfg, key, None)
        if isinstance(v, int):
            return v
    return None


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(path, ModuleList)`` of the decoder blocks."""
    want = _num_layers(model)
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if want is not None and len(mod) != want:
            continue
        if not any(is_linear(m) or type(m).__name__ == "LowRankSparseLinear" for m in mod[0].modules()):  # compressed blocks too
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[0]:
            best = (size, name, mod)
    if best is None:
        raise CapllmError(f"could not find the decoder blocks of {type(model).__name__}: no ModuleList of {want} blocks holding linear layers")
    return best[1], best[2]


def block_linears(block: nn.Module, block_path: str, block_index: int) -> list[LinearHandle]:
    """Every linear of one decoder block, in module order."""
    out = []
    for local, mod in block.named_modules():
        if is_linear(mod):
            out.append(LinearHandle(f"{block_path}.{block_index}.{local}", mod, block_index, local))
    return out


def find_linears(model: nn.Module) -> list[LinearHandle]:
    """Every compressible linear of the decoder, block by block."""
    path, blocks = find_decoder_blocks(model)
    handles = []
    for i, block in enumerate(blocks):
        handles.extend(block_linears(block, path, i))
    return handles


def count_params(model: nn.Module) -> int:
    """Parameters of the whole model, tied weights counted once."""
    seen = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total
