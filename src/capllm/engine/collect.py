"""Input statistics of every decoder linear from one pass of the *dense* model.

Unlike :func:`capllm.engine.layerwise.run_layerwise` (which re-runs each block after compressing
it), this runs the unmodified model on the calibration windows with a forward hook on every
linear and accumulates :class:`~capllm.engine.stats.InputStats` (``E[x²]`` by default). Stage 1
of CAP uses it for activation-aware RPCA (``W·diag(sqrt(E x_j²))``); every matrix sees the
dense model's activations.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from capllm.engine.stats import InputStats
from capllm.models.layers import find_linears


@torch.no_grad()
def collect_input_stats(model: nn.Module, windows: torch.Tensor, device: torch.device | str = "cpu", progress: bool = False, **stats_kwargs) -> dict[str, InputStats]:
    """``{linear name: InputStats}`` over all tokens of ``windows (nsamples, seqlen)``.

    ``stats_kwargs`` go to :class:`InputStats` (``sq=True`` by default; ``abs_mean``, ``gram``).
    The model is moved to ``device`` and left there.
    """
    device = torch.device(device)
    model.to(device)
    handles = find_linears(model)
    stats = {h.name: InputStats(h.shape[1], device, **stats_kwargs) for h in handles}
    hooks = [h.module.register_forward_hook(lambda mod, inp, out, s=stats[h.name]: s.add_batch(inp[0].detach())) for h in handles]
    was_training = model.training
    model.eval()
    try:
        for w in tqdm(windows, desc="calibration pass", disable=not progress, unit="win"):
            model(w.unsqueeze(0).to(device), use_cache=False)
    finally:
        for hk in hooks:
            hk.remove()
        model.train(was_training)
    return stats
