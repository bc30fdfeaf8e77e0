"""Block tuning (capllm.engine.block_tune): each compressed block's kept values trained on the
block's output, support fixed, through the one layer-wise engine."""

from __future__ import annotations

import copy

import pytest
import torch

from capllm.engine.block_tune import BlockTune
from capllm.engine.compressed import CompressedWeight
from capllm.engine.context import CompressionContext
from capllm.engine.layerwise import run_layerwise
from capllm.errors import CapllmError
from capllm.methods.base import get_method
from conftest import random_calibration, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _proj(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "layers." in k or ".h." in k}


class _NoisyOnSupport:
    """A planted layer-wise "method": keep the support ``W ≠ 0`` of an already sparse model and
    perturb the kept values, so the dense model is reachable on that support (loss 0)."""

    name, needs_calibration = "planted", True

    def __init__(self, tune: BlockTune, noise: float = 0.3) -> None:
        self.block_tune, self.noise = tune, noise
        self.g = torch.Generator().manual_seed(5)

    def layer_compressor(self, handle):
        outer = self

        class C:
            def add_batch(self, inp, out):
                pass

            def compress(self, W):
                mask = W != 0
                S = (W + outer.noise * W.abs().mean() * torch.randn(W.shape, generator=outer.g)) * mask
                return CompressedWeight(S=S, mask=mask)

            def free(self):
                pass

        return C()


def _sparsify(model, g):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name and p.dim() == 2:
                p.mul_(torch.rand(p.shape, generator=g) < 0.5)


def _tune_planted(tune: BlockTune):
    """A sparse llama with its kept values perturbed (:class:`_NoisyOnSupport`), tuned with
    ``tune`` on 16 windows: ``(planted weights, tuned weights, one tuning record per block)``."""
    model = tiny_model("llama")
    _sparsify(model, torch.Generator().manual_seed(0))
    planted = _proj(model)
    ctx = CompressionContext(model, random_calibration(n=16, L=32), torch.device("cpu"), progress=False)
    run_layerwise(ctx, _NoisyOnSupport(tune))
    return planted, _proj(model), [r.info["block_tune"] for r in ctx.records.values() if "block_tune" in r.info]


def _assert_on_support(planted: dict, tuned: dict) -> None:
    for k, want in planted.items():
        if "proj" in k:
            assert int(((tuned[k] != 0) & (want == 0)).sum()) == 0, k  # nothing off the support


def test_tuning_recovers_a_planted_model_on_its_support():
    """The dense model is itself sparse on the support the method keeps; the kept values are
    perturbed. Tuning towards the dense stream must bring the block outputs back (held-out error
    down five-fold) and never write a value off the support. (The values themselves are not
    identifiable from 384 tokens through the softmax, so only the outputs are checked.)"""
    planted, noisy, _ = _tune_planted(BlockTune(epochs=0, lr=1.5e-2, batch=2, hold_out=4))
    _, tuned, recs = _tune_planted(BlockTune(epochs=40, lr=1.5e-2, batch=2, hold_out=4))
    assert len(recs) == 2  # one record per block, on its first linear
    for r in recs:
        assert r["held_out_after"] < 0.2 * r["held_out_before"], r
        assert r["held_out_after"] == min([r["held_out_before"], *r["held_out"]])  # the best epoch is the one kept
    assert any(not torch.equal(tuned[k], noisy[k]) for k in planted)
    _assert_on_support(planted, tuned)


def test_backoff_recovers_a_step_that_overshoots():
    """A step so large that every epoch overshoots (without backoff epoch 0 is kept, nothing is
    gained); with ``backoff`` each failed epoch restarts from the best values at a quarter of the
    step, until the step is small enough to descend: the held-out error then falls, the restarts
    are recorded, and nothing leaves the support."""
    _, _, plain = _tune_planted(BlockTune(epochs=6, lr=0.3, batch=2, hold_out=4))
    planted, tuned, recs = _tune_planted(BlockTune(epochs=6, lr=0.3, batch=2, hold_out=4, backoff=0.25))
    assert all(r["kept_epoch"] == 0 and "backoff_after" not in r for r in plain)
    for r in recs:
        assert r["backoff_after"] and r["backoff_after"][0] == 1, r
        assert r["held_out_after"] < 0.5 * r["held_out_before"], r
        assert r["held_out_after"] == min([r["held_out_before"], *r["held_out"]])
    _assert_on_support(planted, tuned)


def test_backoff_outside_zero_one_is_refused():
    with pytest.raises(CapllmError, match="tune_backoff"):
        BlockTune(epochs=1, backoff=1.0).check("cap")


def test_a_planted_model_is_not_changed_when_no_epoch_helps():
    """Values that are already exact (no noise): every epoch can only move away, so epoch 0 is
    kept and the weights are bit-identical to the method's."""
    model = tiny_model("llama")
    _sparsify(model, torch.Generator().manual_seed(0))
    planted = _proj(model)
    ctx = CompressionContext(model, random_calibration(n=8, L=32), torch.device("cpu"), progress=False)
    run_layerwise(ctx, _NoisyOnSupport(BlockTune(epochs=2, lr=0.5, batch=2, hold_out=4), noise=0.0))
    recs = [r.info["block_tune"] for r in ctx.records.values() if "block_tune" in r.info]
    assert all(r["kept_epoch"] == 0 and r["held_out_before"] < 1e-10 for r in recs)
    for k, v in _proj(model).items():
        assert torch.equal(v, planted[k]), k


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("target", ["dense", "local"])
def test_sparsegpt_with_tuning_keeps_its_masks_and_lowers_every_block_error(arch, target):
    """Same kept counts as SparseGPT alone and, in block 0 (the same inputs in both runs), the same
    masks; each block's held-out error no higher than after the OBS pass; the values do move
    (Conv1D weights of GPT-2 included). Later blocks' masks may differ: their inputs come from
    tuned blocks."""
    runs = {}
    for epochs in (0, 4):
        model = tiny_model(arch)
        ctx = CompressionContext(model, random_calibration(n=16, L=32), torch.device("cpu"), progress=False)
        get_method("sparsegpt")(0.5, None, {"tune_epochs": str(epochs), "tune_lr": "5e-3", "tune_batch": "2", "tune_target": target,
                                            "tune_hold_out": "4"}).compress_model(ctx)
        runs[epochs] = (_proj(model), ctx)
    (plain, c0), (tuned, c1) = runs[0], runs[4]
    assert [r.kept_params for r in c0.records.values()] == [r.kept_params for r in c1.records.values()]
    moved = 0
    for h in c1.linears:  # block 0 sees the same inputs in both runs, so SparseGPT picks the same support
        k = h.name + ".weight"
        assert int((tuned[k] != 0).sum()) <= c1.records[h.name].nnz, k  # nothing written off the support
        if h.block_index == 0:
            assert torch.equal(plain[k] != 0, tuned[k] != 0), k
            moved += int(not torch.equal(plain[k], tuned[k]))
    recs = [r.info["block_tune"] for r in c1.records.values() if "block_tune" in r.info]
    assert len(recs) == 2 and all(r["held_out_after"] <= r["held_out_before"] for r in recs)
    assert all(r["train"][-1] < r["train"][0] for r in recs if r["kept_epoch"] > 0)
    assert moved > 0 or all(r["kept_epoch"] == 0 for r in recs)
    assert any(r["kept_epoch"] > 0 for r in recs)


def _plant_low_rank(model, g):
    """Weights = a strong rank-2 part + the random init, so CAP keeps singular directions."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name and p.dim() == 2:
                m, n = p.shape
                p.add_(0.1 * torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g))


def test_cap_with_tuning_trains_factors_and_sparse_values_on_their_support():
    from test_allocation_robust import OPTS

    runs = {}
    for epochs in (0, 3):
        model = tiny_model("llama")
        _plant_low_rank(model, torch.Generator().manual_seed(1))
        ctx = CompressionContext(model, random_calibration(n=16, L=32), torch.device("cpu"), progress=False)
        get_method("cap")(0.5, None, {**OPTS, "score": "fisher", "lam_scale": "0.3", "tune_epochs": str(epochs), "tune_lr": "1e-3",
                                      "tune_batch": "2", "tune_hold_out": "4"}).compress_model(ctx)
        runs[epochs] = (copy.deepcopy(dict(model.named_parameters())), ctx)
    (p0, c0), (p1, c1) = runs[0], runs[3]
    assert p0.keys() == p1.keys()
    assert [(r.rank, r.nnz) for r in c0.records.values()] == [(r.rank, r.nnz) for r in c1.records.values()]
    assert any(k.endswith(".U") for k in p1), "the test needs a matrix with a low-rank part"
    for k in p0:
        if k.endswith(".S") or (k.endswith("weight") and "proj" in k):
            assert torch.equal(p0[k] != 0, p1[k] != 0), k
    recs = [r.info["block_tune"] for r in c1.records.values() if "block_tune" in r.info]
    assert all(r["held_out_after"] <= r["held_out_before"] for r in recs) and any(r["kept_epoch"] > 0 for r in recs)
    assert any(not torch.equal(p0[k], p1[k]) for k in p0 if k.endswith(".U") or k.endswith(".V"))


def test_tuning_options_are_checked_before_any_work():
    with pytest.raises(CapllmError, match="tune_target"):
        get_method("sparsegpt")(0.5, None, {"tune_epochs": "1", "tune_target": "teacher"})
    with pytest.raises(CapllmError, match="tune_lr"):
        get_method("sparsegpt")(0.5, None, {"tune_epochs": "1", "tune_lr": "0"})
    with pytest.raises(CapllmError, match="refit=obs"):
        get_method("cap")(0.5, None, {"tune_epochs": "1", "refit": "none"})
    model = tiny_model("llama")
    ctx = CompressionContext(model, random_calibration(n=4, L=16), torch.device("cpu"), progress=False)
    with pytest.raises(CapllmError, match="at least 8 calibration windows"):
        get_method("sparsegpt")(0.5, None, {"tune_epochs": "1"}).compress_model(ctx)


def test_caps_default_tuning_runs_with_enough_windows_and_is_skipped_with_a_record_below(capsys):
    """CAP tunes by default (``tune_epochs=10``): with ≥ 8 calibration windows every compressed block
    carries a tuning record; with fewer the run goes on untuned, says so in one line and records
    why; an explicit ``tune_epochs`` with too few windows is an error; ``refit=none`` (no layer-wise
    pass) runs untuned with a record."""
    from test_allocation_robust import OPTS

    assert get_method("cap")(0.5, None, {}).block_tune.epochs == 10
    assert get_method("cap-uniform")(0.5, None, {}).block_tune.epochs == 10
    assert get_method("sparsegpt")(0.5, None, {}).block_tune.active is False
    opts = {**OPTS, "guard": "none", "tune_batch": "4"}
    ctx = CompressionContext(tiny_model("llama"), random_calibration(n=8, L=16), torch.device("cpu"), progress=False)
    get_method("cap")(0.5, None, opts).compress_model(ctx)
    recs = [r.info["block_tune"] for r in ctx.records.values() if "block_tune" in r.info]
    assert len(recs) == len({h.block_index for h in ctx.linears}) and all(r["epochs_run"] == 10 for r in recs)
    assert "block_tune" not in ctx.extra

    ctx = CompressionContext(tiny_model("llama"), random_calibration(n=4, L=16), torch.device("cpu"), progress=False)
    capsys.readouterr()
    get_method("cap")(0.5, None, opts).compress_model(ctx)
    assert "--nsamples ≥ 8" in ctx.extra["block_tune"]["skipped"]
    assert [ln for ln in capsys.readouterr().err.splitlines() if "tuning" in ln] == [f"capllm: {ctx.extra['block_tune']['skipped']}"]
    assert not any("block_tune" in r.info for r in ctx.records.values())
    ctx = CompressionContext(tiny_model("llama"), random_calibration(n=4, L=16), torch.device("cpu"), progress=False)
    with pytest.raises(CapllmError, match="at least 8 calibration windows"):
        get_method("cap")(0.5, None, {**opts, "tune_epochs": "5"}).compress_model(ctx)

    ctx = CompressionContext(tiny_model("llama"), random_calibration(n=8, L=16), torch.device("cpu"), progress=False)
    get_method("cap")(0.5, None, {**opts, "refit": "none"}).compress_model(ctx)
    assert "refit=none" in ctx.extra["block_tune"]["skipped"] and not any("block_tune" in r.info for r in ctx.records.values())
