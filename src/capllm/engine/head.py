"""The model's head: logits and next-token loss from the output of the LAST decoder block.

Whatever a model does after its decoder stack — a final norm (LLaMA ``norm``, GPT-2 ``ln_f``,
OPT ``final_layer_norm``, GPT-NeoX ``final_layer_norm``), a projection (OPT ``project_out``),
the LM head (``lm_head`` / ``embed_out``), Gemma's final logit soft-capping
``logits = c·tanh(logits / c)`` — is done by the model's own ``forward``. :class:`Head` runs that
forward with the decoder ModuleList temporarily swapped for a ModuleList of the same length of
*passthrough* modules: every one returns its hidden-state input unchanged, except the last,
which returns the injected final hidden state ``h_L``. Everything before the stack (embeddings,
rotary tables, masks) runs too but its result is discarded, so the logits are exactly
``head(h_L)`` as the full model computes them, for any architecture, and the graph starts at
``h_L`` (gradients ``∂ℓ/∂h_L`` come from plain autograd).

Only the non-block parts of the model must be on ``device`` (:func:`place_outside_blocks`).
The summed next-token cross-entropy of one window ``ids`` (length ``L``) is

    ℓ(h_L) = Σ_{t=0}^{L-2} −log softmax(logits_t)[ids_{t+1}].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from capllm.engine.capture import copy_simple_attributes
from capllm.errors import CapllmError
from capllm.models.layers import find_decoder_blocks

class _Passthrough(nn.Module):
    """Stands in for one decoder block: returns its input (or the injected state), as ``kind``."""

    def __init__(self, like: nn.Module):
        super().__init__()
        copy_simple_attributes(like, self)
        self.inject: torch.Tensor | None = None
        self.as_tuple = False

    def forward(self, *args, **kwargs):
        h = self.inject if self.inject is not None else (args[0] if args else kwargs["hidden_states"])
        return (h,) if self.as_tuple else h


class Head:
    """Logits and summed next-token loss from final hidden states ``(1, L, d)`` of one window.

    ``tuple_output``: whether real blocks return a tuple ``(hidden, ...)`` instead of a tensor
    (``None``: detected on the first call from the shape of the logits).
    """

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu", blocks_path: str | None = None, tuple_output: bool | None = None):
        if blocks_path is None:
            blocks_path, blocks = find_decoder_blocks(model)
        else:
            blocks = model.get_submodule(blocks_path)
        self.model, self.device = model, torch.device(device)
        parent_name, _, self._child = blocks_path.rpartition(".")
        self._parent = model.get_submodule(parent_name) if parent_name else model
        self._stand_ins = nn.ModuleList(_Passthrough(b) for b in blocks)
        self.tuple_output = tuple_output

    def _run(self, final_hidden: torch.Tensor, ids: torch.Tensor, as_tuple: bool) -> torch.Tensor:
        blocks = getattr(self._parent, self._child)
        for p in self._stand_ins:
            p.as_tuple = as_tuple
        out_emb = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if out_emb is not None and getattr(out_emb, "weight", None) is not None and out_emb.weight.is_floating_point():
            final_hidden = final_hidden.to(out_emb.weight.dtype)  # blocks may compute wider than the head is stored
        self._stand_ins[-1].inject = final_hidden
        setattr(self._parent, self._child, self._stand_ins)
        try:
            return self.model(input_ids=ids.reshape(1, -1).to(self.device), use_cache=False).logits
        finally:
            setattr(self._parent, self._child, blocks)
            self._stand_ins[-1].inject = None

    def logits(self, final_hidden: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """``(1, L, V)`` logits of the model for last-block output ``final_hidden`` ``(1, L, d)``.

        ``ids``: the window's token ids ``(L,)``; only their count matters (``None``: zeros).
        """
        h = final_hidden.to(self.device)
        L = h.shape[-2]
        if ids is None:
            ids = torch.zeros(L, dtype=torch.long)
        ok = lambda t: t.dim() == 3 and tuple(t.shape[:2]) == (1, L)  # noqa: E731
        if self.tuple_output is not None:
            return self._run(h, ids, self.tuple_output)
        err: Exception | None = None
        for as_tuple in (False, True):
            try:
                out = self._run(h, ids, as_tuple)
            except (TypeError, IndexError, AttributeError, RuntimeError, ValueError) as e:
                err = e
                continue
            if ok(out):
                self.tuple_output = as_tuple
                return out
        raise CapllmError(f"could not run the head of {type(self.model).__name__} on injected final hidden states") from err

    def _chunks(self, L: int, chunk: int | None):
        """Token ranges ``[a, b)`` whose logits predict ``ids[a+1 : b+1]`` (the last token predicts nothing).

        The head acts on every position separately (norm, projection, soft-capping), so the
        loss is a sum over chunks and each chunk's logits (``chunk × vocab``) are all that
        is ever held — not the window's ``L × vocab``.
        """
        step = L - 1 if not chunk else chunk
        return [(a, min(a + step, L - 1)) for a in range(0, L - 1, step)]

    def loss(self, final_hidden: torch.Tensor, ids: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Summed next-token cross-entropy ``ℓ`` of one window (a float32 scalar, differentiable)."""
        ids = ids.reshape(-1).to(self.device)
        total = None
        for a, b in self._chunks(ids.numel(), chunk):
            logits = self.logits(final_hidden[:, a:b], ids[a:b])[0].float()
            part = F.cross_entropy(logits, ids[a + 1 : b + 1], reduction="sum")
            total = part if total is None else total + part
        return total

    def loss_and_grad(self, final_hidden: torch.Tensor, ids: torch.Tensor, chunk: int | None = 128) -> tuple[float, torch.Tensor]:
        """``(ℓ, ∂ℓ/∂h_L)``: the gradient has ``final_hidden``'s shape and dtype, on ``device``.

        Computed ``chunk`` tokens at a time (the loss of token ``t`` depends on ``h_L[t]`` only),
        so the logits of the whole window never exist at once. No parameter gradients are formed
        as long as the head's parameters do not require grad.
        """
        ids = ids.reshape(-1).to(self.device)
        h = final_hidden.detach().to(self.device)
        g = torch.zeros_like(h)
        total = 0.0
        for a, b in self._chunks(ids.numel(), chunk):
            hc = h[:, a:b].clone().requires_grad_(True)
            with torch.enable_grad():
                logits = self.logits(hc, ids[a:b])[0].float()
                part = F.cross_entropy(logits, ids[a + 1 : b + 1], reduction="sum")
                (gc,) = torch.autograd.grad(part, hc)
            g[:, a:b] = gc
            total += part.item()
        return total, g
