"""Input statistics of every decoder linear from the *dense* model, block by block.

A statistics-only pass of :func:`capllm.engine.layerwise.run_layerwise`: each block runs on the
dense model's inputs to it with a hook on every linear that accumulates
:class:`~capllm.engine.stats.InputStats` (``E[x²]`` by default); nothing is written into the
model. Only one block is on the device at a time. ``capllm decompose --act-aware`` uses it for
activation-aware robust PCA (``W·diag(sqrt(E x_j²))``). Asking for ``gram=True`` here keeps
every linear's Gram — small models only; CAP itself reduces each block's Grams as it goes
(:mod:`capllm.allocate.stage1`).
"""

from __future__ import annotations

import torch
from torch import nn

from capllm.engine.stats import InputStats


class _Accumulate:
    def __init__(self, stats: InputStats) -> None:
        self.stats = stats

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        self.stats.add_batch(inp)


class _StatsPass:
    name = "input-statistics"
    needs_calibration = True
    modifies_weights = False

    def __init__(self, device: torch.device, stats_kwargs: dict) -> None:
        self.device, self.kwargs = device, stats_kwargs
        self.stats: dict[str, InputStats] = {}

    def layer_compressor(self, handle):
        st = InputStats(handle.shape[1], self.device, **self.kwargs)
        self.stats[handle.name] = st
        return _Accumulate(st)

    def finish_block(self, ctx, index, handles, comps) -> dict:
        for h in handles:  # keep the statistics on the CPU, not on the device
            st = self.stats[h.name]
            for attr in ("sq", "abs", "gram"):
                t = getattr(st, attr)
                if t is not None:
                    setattr(st, attr, t.cpu())
        return {}


@torch.no_grad()
def collect_input_stats(model: nn.Module, windows: torch.Tensor, device: torch.device | str = "cpu", progress: bool = False, **stats_kwargs) -> dict[str, InputStats]:
    """``{linear name: InputStats}`` (on the CPU) over all tokens of ``windows (nsamples, seqlen)``.

    ``stats_kwargs`` go to :class:`InputStats` (``sq=True`` by default; ``abs_mean``, ``gram``).
    """
    from capllm.data.calibration import CalibrationSet
    from capllm.data.sources import TextSource
    from capllm.engine.context import CompressionContext
    from capllm.engine.layerwise import run_layerwise

    device = torch.device(device)
    calib = CalibrationSet(windows, TextSource("windows", "given", "", "in-memory", 0), 0)
    ctx = CompressionContext(model, calib, device, progress=progress)
    was_training = model.training
    model.eval()
    stats_pass = _StatsPass(device, stats_kwargs)
    try:
        run_layerwise(ctx, stats_pass, desc="calibration statistics: blocks")
    finally:
        model.train(was_training)
    return {h.name: stats_pass.stats[h.name] for h in ctx.linears}
