"""Block-wise reconstruction of the kept values (our addition; in neither CAP nor SparseGPT).

A layer-wise solve (SparseGPT's OBS pass, CAP's refit) makes each linear's *own* output error
``‖(W − W̃) X‖`` small, one matrix at a time, with the other matrices of the block dense. What
the next block sees is the block's output, in which the errors of ``q/k/v/o`` meet in the
softmax and those of ``gate/up/down`` in the activation. After a block is compressed this step
trains its kept values — the sparse values on their fixed support and the low-rank factors —
to make the *block's* output match a target, by Adam (each tensor's step ``lr`` times the RMS of
its kept values) on

    L(θ) = Σ_s ‖f_b(X̃_s; θ) − T_s‖² / Σ_s ‖T_s‖²,

with ``X̃_s`` the block's inputs from the already compressed blocks (the engine's stream) and
``T_s`` the target of window ``s``:

* ``target = dense``: the dense model's output of block ``b`` on the dense model's own inputs
  (the engine keeps a second, dense stream): each block also corrects the error the blocks
  before it passed on (as EBFT, Guo et al. 2024, arXiv 2402.12419, and the block-wise
  reconstruction of BRECQ, Li et al. 2021);
* ``target = local``: the dense block on the compressed inputs — the layer-wise objective lifted
  to the block, at no extra forward.

The support never changes (gradients off the mask are zero, and the values there stay exactly
zero), so the kept-parameter count and the allocation are untouched. Every ``hold_out``-th
window is not trained on: the values kept are those of the epoch with the lowest held-out loss,
epoch 0 (no change) included, so the step can only lower the held-out block error. With
``backoff = β ∈ (0, 1)`` an epoch whose held-out loss is not below the best so far sends the
training back to the best values with every step multiplied by ``β`` (and Adam's moments reset),
instead of going on from where it overshot; the number of epochs is the same. The windows
and their order are fixed by global window index and seed, and gradients are summed over ranks,
so several processes reach the same values as one (up to summation order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from capllm.errors import CapllmError


@dataclass(frozen=True)
class BlockTune:
    """How to train each block's kept values after it is compressed (``epochs = 0``: not at all)."""

    epochs: int = 0
    lr: float = 3e-3  # Adam's step as a fraction of each tensor's RMS (measured: BENCHMARKS.md, CAP quality)
    batch: int = 4  # windows per Adam step
    target: str = "dense"  # dense | local
    hold_out: int = 8  # every hold_out-th window (by global index) is held out for the choice of epoch
    backoff: float = 0.0  # β ∈ (0, 1): after an epoch that did not improve, restart from the best at β × the step; 0: off
    seed: int = 0
    # asked for by the user (an error when the run has too few windows) or a method's default
    # (then skipped with a one-line notice and a record)
    strict: bool = True

    @property
    def active(self) -> bool:
        return self.epochs > 0

    def fits(self, n_windows: int) -> bool:
        """Whether ``n_windows`` calibration windows leave both a training and a held-out set."""
        return n_windows >= self.hold_out

    def too_few(self, n_windows: int) -> CapllmError:
        """The one-line error for a run whose ``n_windows`` do not :meth:`fit`."""
        return CapllmError(f"block tuning needs at least {self.hold_out} calibration windows (tune_hold_out={self.hold_out}; "
                           f"got {n_windows}): pass --nsamples ≥ {self.hold_out} or a smaller tune_hold_out")

    def check(self, method: str) -> None:
        if self.epochs < 0 or self.batch < 1 or self.lr <= 0 or self.hold_out < 2 or not 0 <= self.backoff < 1:
            raise CapllmError(f"{method}: tune_epochs ≥ 0, tune_batch ≥ 1, tune_lr > 0, tune_hold_out ≥ 2 and 0 ≤ tune_backoff < 1 "
                              f"are needed (got {self.epochs}, {self.batch}, {self.lr}, {self.hold_out}, {self.backoff})")
        if self.target not in ("dense", "local"):
            raise CapllmError(f"{method} option tune_target={self.target!r}: use dense or local")


@dataclass(frozen=True)
class BlockTuneOptions:
    """The method options that build a :class:`BlockTune` (mixed into a method's ``Options``)."""

    tune_epochs: int = BlockTune.epochs
    tune_lr: float = BlockTune.lr  # relative to each tensor's RMS
    tune_batch: int = BlockTune.batch
    tune_target: str = BlockTune.target
    tune_hold_out: int = BlockTune.hold_out
    tune_backoff: float = BlockTune.backoff

    def block_tune(self, seed: int = 0, strict: bool = True) -> BlockTune:
        return BlockTune(self.tune_epochs, self.tune_lr, self.tune_batch, self.tune_target, self.tune_hold_out,
                         self.tune_backoff, seed, strict)


def _compressed(handles: list, results: dict):
    """``(handle, CompressedWeight, factored)`` for each linear of the block that was compressed;
    ``factored``: the module is a :class:`~capllm.format.modules.LowRankSparseLinear` (``U``,
    ``V``, ``S``), else an ordinary linear whose ``weight`` is ``S``."""
    from capllm.format.modules import LowRankSparseLinear

    for h in handles:
        cw = results.get(h.name)
        if cw is not None:
            yield h, cw, isinstance(h.module, LowRankSparseLinear)


def _trainable(handles: list, results: dict) -> list[tuple[nn.Parameter, torch.Tensor | None]]:
    """``(parameter, mask or None)`` for every kept tensor of the block's compressed linears."""
    out = []
    for h, cw, factored in _compressed(handles, results):
        mod = h.module
        if factored:
            for name in ("U", "V"):
                if getattr(mod, name) is not None:
                    out.append((getattr(mod, name), None))
            if mod.S is not None:
                out.append((mod.S, cw.mask.to(mod.S.device)))
        else:
            mask = cw.mask if cw.mask is not None else torch.ones(h.shape, dtype=torch.bool)
            out.append((mod.weight, (mask.t() if h.conv1d else mask).to(mod.weight.device)))
    return out


def _rms(p: torch.Tensor, mask: torch.Tensor | None) -> float:
    """Root mean square of a tensor's kept values: Adam's step is ``lr`` times this, so one
    ``tune_lr`` means the same relative step on every model (weight scales differ ~10× between
    SmolLM2 and Gemma-3)."""
    with torch.no_grad():
        vals = p[mask] if mask is not None else p
        return float(vals.float().square().mean().sqrt()) if vals.numel() else 0.0


def tune_block(block: nn.Module, handles: list, results: dict, hidden: list[torch.Tensor], targets: list[torch.Tensor],
               run_block, global_ids: list[int], n_total: int, cfg: BlockTune, index: int, dist) -> dict:
    """Train the kept values of ``block`` (already holding ``results``) towards ``targets``.

    ``run_block(s, x)`` is the block's output for local window ``s`` on input ``x``;
    ``global_ids[s]`` is that window's index among all ``n_total`` calibration windows (of every
    rank). Returns the record: the held-out loss before and after each epoch, each epoch's training
    loss (summed while it trained: no extra forward), and the epoch kept.
    """
    params = _trainable(handles, results)
    if not params:
        return {"epochs_run": 0, "kept_epoch": 0}
    local = {g: s for s, g in enumerate(global_ids)}
    held = [g for g in range(n_total) if g % cfg.hold_out == cfg.hold_out - 1]
    train = [g for g in range(n_total) if g % cfg.hold_out != cfg.hold_out - 1]
    if not cfg.fits(n_total):
        raise cfg.too_few(n_total)
    dev = params[0][0].device
    scale = torch.zeros((), dtype=torch.float64, device=dev)
    for g in train:
        if g in local:
            scale += targets[local[g]].double().square().sum().to(dev)
    dist.all_reduce_(scale)
    scale = float(scale.clamp_min(1e-30))

    def loss_over(ids: list[int]) -> float:
        tot = torch.zeros(2, dtype=torch.float64, device=dev)
        with torch.no_grad():
            for g in ids:
                if g in local:
                    s = local[g]
                    t = targets[s].to(dev)
                    tot[0] += (run_block(s, hidden[s]).float() - t.float()).double().square().sum()
                    tot[1] += t.double().square().sum()
        dist.all_reduce_(tot)
        return float(tot[0] / tot[1].clamp_min(1e-30))

    best = loss_over(held)
    record = {"held_out_before": best, "held_out": [], "train": [], "kept_epoch": 0}
    snapshot = [p.detach().clone() for p, _ in params]
    for p, _ in params:
        p.requires_grad_(True)
        p.grad = torch.zeros_like(p)  # a rank with none of a batch's windows still takes part in its sum
    steps = [cfg.lr * _rms(p, mask) for p, mask in params]

    def adam(factor: float) -> torch.optim.Adam:
        return torch.optim.Adam([{"params": [p], "lr": factor * lr} for (p, _), lr in zip(params, steps)])

    factor = 1.0
    opt = adam(factor)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
    try:
        for epoch in range(1, cfg.epochs + 1):
            order = [train[i] for i in torch.randperm(len(train), generator=gen).tolist()]
            running = torch.zeros((), dtype=torch.float64, device=dev)  # the epoch's training loss, as it was trained on
            for b0 in range(0, len(order), cfg.batch):
                opt.zero_grad(set_to_none=False)
                with torch.enable_grad():
                    for g in order[b0:b0 + cfg.batch]:
                        if g in local:
                            s = local[g]
                            diff = run_block(s, hidden[s]).float() - targets[s].to(dev).float()
                            loss = diff.square().sum() / scale
                            loss.backward()
                            running += loss.detach().double()
                for p, mask in params:
                    dist.all_reduce_(p.grad)
                    if mask is not None:
                        p.grad.mul_(mask)
                opt.step()
                with torch.no_grad():
                    for p, mask in params:
                        if mask is not None:
                            p.mul_(mask)
            dist.all_reduce_(running)
            record["train"].append(float(running))
            h = loss_over(held)
            record["held_out"].append(h)
            if h < best:
                best = h
                record["kept_epoch"] = epoch
                snapshot = [p.detach().clone() for p, _ in params]
            elif cfg.backoff > 0 and epoch < cfg.epochs:  # back to the best values, a smaller step, fresh moments
                with torch.no_grad():
                    for (p, _), v in zip(params, snapshot):
                        p.copy_(v)
                factor *= cfg.backoff
                opt = adam(factor)
                record.setdefault("backoff_after", []).append(epoch)
    finally:
        for p, _ in params:
            p.requires_grad_(False)
            p.grad = None
        del opt
    with torch.no_grad():
        for (p, _), v in zip(params, snapshot):
            p.copy_(v)
    record["held_out_after"] = best
    record["epochs_run"] = cfg.epochs
    return record


def read_back(handles: list, results: dict) -> None:
    """Put the module's trained tensors back into each :class:`CompressedWeight` (which the
    engine's checkpoint saves), keeping the support."""
    from dataclasses import replace

    for h, cw, factored in list(_compressed(handles, results)):
        mod = h.module
        if factored:
            new = {k: getattr(mod, k).detach().to(getattr(cw, k).dtype).clone() for k in ("U", "V", "S")
                   if getattr(cw, k) is not None and getattr(mod, k, None) is not None}
        else:
            new = {"S": h.weight_copy().to(cw.S.dtype if cw.S is not None else torch.float32)}
        results[h.name] = replace(cw, **new)
