"""CAP end to end on a tiny model: budget, ablations, policy bookkeeping, refit, resume."""

from __future__ import annotations

import pytest
import torch

from capllm.engine.context import CompressionContext
from capllm.methods.base import get_method
from conftest import tiny_model, random_calibration


def _ctx(model, n=4, L=32, seed=0):
    return CompressionContext(model, random_calibration(n=n, L=L, seed=seed), torch.device("cpu"), progress=False)


FAST = {"steps": "1", "samples": "2", "policy_windows": "2", "rpca_max_iter": "60", "rpca_tol": "1e-5"}


@pytest.mark.parametrize("refit", ["none", "obs"])
def test_cap_meets_the_budget_and_runs(refit):
    model = tiny_model("llama", seed=3)
    ctx = _ctx(model)
    get_method("cap")(0.5, None, {**FAST, "refit": refit}).compress_model(ctx)
    b = ctx.extra["budget"]
    assert b["achieved"] <= b["target"] and b["target"] - b["achieved"] < b["max_direction_cost"]
    kept = sum(r.kept_params for r in ctx.records.values())
    assert kept == b["achieved"]
    assert b["target"] == int(0.5 * ctx.dense_linear_params)
    alloc = ctx.extra["allocation"]
    assert len(alloc) == len(ctx.linears) and sum(a["kept_params"] for a in alloc) == kept
    assert len(ctx.extra["policy"]["curve"]) == 1
    out = model(torch.randint(0, 128, (1, 16))).logits
    assert torch.isfinite(out).all()


def test_refit_lowers_layer_output_error():
    """Same allocation, with and without the OBS refit: the refit's outputs are closer to dense."""
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(9))
    dense = tiny_model("llama", seed=4)
    with torch.no_grad():
        ref = dense(ids).logits
    errs = {}
    for refit in ("none", "obs"):
        model = tiny_model("llama", seed=4)
        get_method("cap")(0.5, None, {**FAST, "steps": "0", "refit": refit}).compress_model(_ctx(model, n=8))
        with torch.no_grad():
            errs[refit] = float((model(ids).logits - ref).pow(2).mean())
    assert errs["obs"] < errs["none"]


def test_uniform_and_threshold_ablations():
    for name, opts in (("cap-uniform", {"rpca_max_iter": "60", "rpca_tol": "1e-5"}), ("rpca-threshold", {"rpca_max_iter": "60", "rpca_tol": "1e-5", "rank_share": "0.2"})):
        model = tiny_model("qwen2", seed=1)
        ctx = _ctx(model)
        get_method(name)(0.4, None, opts).compress_model(ctx)
        b = ctx.extra["budget"]
        assert b["achieved"] <= b["target"]
        if name == "cap-uniform":  # every matrix within one direction of its own share
            for a in ctx.extra["allocation"]:
                m, n = a["shape"]
                assert int(0.6 * m * n) - (m + n) < a["kept_params"] <= int(0.6 * m * n)


def test_zero_steps_is_the_initial_score_mask():
    model = tiny_model("llama", seed=5)
    ctx = _ctx(model)
    get_method("cap")(0.5, None, {**FAST, "steps": "0", "refit": "none"}).compress_model(ctx)
    assert ctx.extra["policy"]["curve"] == [] and ctx.extra["policy"]["candidates_changed_vs_initial_scores"] == 0


def test_stage1_cache_is_reused(tmp_path):
    opts = {**FAST, "steps": "0", "refit": "none", "stage1_dir": str(tmp_path / "s1")}
    model = tiny_model("llama", seed=6)
    ctx = _ctx(model)
    get_method("cap")(0.5, None, opts).compress_model(ctx)
    first = {r.name: r.kept_params for r in ctx.records.values()}
    files = sorted((tmp_path / "s1").glob("*.safetensors"))
    assert len(files) == len(ctx.linears)
    stamps = {f: f.stat().st_mtime_ns for f in files}
    model2 = tiny_model("llama", seed=6)
    ctx2 = _ctx(model2)
    get_method("cap")(0.5, None, opts).compress_model(ctx2)
    assert {r.name: r.kept_params for r in ctx2.records.values()} == first
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # nothing was decomposed again


def test_cli_cap_with_plot(tiny_model_dir, text_file, tmp_path):
    import json

    from capllm.cli.main import main

    out = tmp_path / "cap"
    rc = main(["compress", "--model", str(tiny_model_dir), "--method", "cap", "--ratio", "0.5", "--calib", str(text_file),
               "--nsamples", "4", "--seqlen", "32", "--dataset", str(text_file), "--eval-seqlen", "64", "--max-windows", "2",
               "--device", "cpu", "--out", str(out), "--quiet", "--plot",
               "--option", "steps=1", "--option", "samples=2", "--option", "policy_windows=2", "--option", "rpca_tol=1e-5"])
    assert rc == 0
    res = json.loads((out / "result.json").read_text())
    alloc = res["method_results"]["allocation"]
    assert sum(a["kept_params"] for a in alloc) == res["params"]["kept_linear"] <= res["params"]["dense_linear"] // 2
    assert (out / "allocation.png").stat().st_size > 10_000
    assert "stage1_rpca" in res["time_s"] and "stage2_policy" in res["time_s"]


def test_spread_bounds_each_matrix_share():
    """spread=0.2: every matrix keeps between 0.8·(1−ρ) and 1.2·(1−ρ) of its parameters (floor within one direction)."""
    model = tiny_model("llama", seed=3)
    ctx = _ctx(model)
    get_method("cap")(0.5, None, {**FAST, "steps": "0", "refit": "none", "spread": "0.2"}).compress_model(ctx)
    b = ctx.extra["budget"]
    assert b["achieved"] <= b["target"] and b["target"] - b["achieved"] < b["max_direction_cost"]
    for a in ctx.extra["allocation"]:
        m, n = a["shape"]
        assert a["kept_params"] <= int(0.6 * m * n)
        assert a["kept_params"] >= int(0.4 * m * n) - (m + n)
    with pytest.raises(Exception, match="spread"):
        get_method("cap")(0.5, None, {**FAST, "steps": "0", "spread": "-1"}).compress_model(_ctx(tiny_model("llama", seed=3)))


def _ctx_held(model, n=4, L=32, held=3, seed=0):
    from capllm.data.calibration import CalibrationSet
    from capllm.data.sources import TextSource

    allw = random_calibration(n=n + held, L=L, seed=seed).windows
    cal = CalibrationSet(allw[:n], TextSource("random", "none", "", "test", 0), seed, allw[n:])
    return CompressionContext(model, cal, torch.device("cpu"), progress=False)


def test_guard_loss_is_the_loss_of_the_masked_model_and_leaves_it_untouched(tmp_path):
    """masked_loss equals the whole model's loss with every linear replaced by W̃ = U'V'ᵀ + S',
    and the model's weights are bit-for-bit the same afterwards."""
    import copy

    import torch.nn.functional as F

    from capllm.allocate.guard import masked_loss
    from capllm.allocate.run import CapRun, open_store

    model = tiny_model("llama", seed=5)
    ctx = _ctx_held(model)
    o = get_method("cap")(0.5, None, {"rpca_max_iter": "20", "stage1_dir": str(tmp_path / "s1")}).options
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with open_store(ctx) as store:
        run = CapRun(ctx, o, store)
        run.stage1(); run.fisher(); run.scores("fisher", "none")
        run.select(run.budget(0.5), 0.5, float("inf"))
        got = masked_loss(ctx, run.decision, ctx.calibration.held_out)
        ref_model = copy.deepcopy(model)
        for h in ctx.linears:
            ref_model.get_submodule(h.name).weight.data = run.decision(h.name).dense()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    w = ctx.calibration.held_out
    with torch.no_grad():
        logits = ref_model(w).logits[:, :-1].float()
    want = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1)))
    assert got == pytest.approx(want, rel=1e-5)


def test_guard_switches_to_the_uniform_split_only_when_it_is_better(tmp_path, monkeypatch):
    """A guard that finds the uniform split better applies exactly cap-uniform's masks; one that
    finds the global allocation better changes nothing; the statistics windows are the same."""
    from capllm.allocate import guard as guard_mod

    opts = {"rpca_max_iter": "20", "stage1_dir": str(tmp_path / "s1")}
    runs = {}
    for tag, method, extra in (("plain", "cap", {"guard": "uniform"}), ("uniform", "cap-uniform", {})):
        first = iter([1.0, 2.0])  # the global allocation kept: the plain run is the unguarded selection
        monkeypatch.setattr(guard_mod, "masked_loss", lambda ctx, decide, windows: next(first))
        model = tiny_model("llama", seed=6)
        ctx = _ctx_held(model)
        get_method(method)(0.5, None, {**opts, **extra}).compress_model(ctx)
        runs[tag] = [(a["rank_kept"], a["nnz_kept"]) for a in ctx.extra["allocation"]]
    assert runs["plain"] != runs["uniform"]
    for prefer, want in (("uniform", "uniform"), ("global", "plain")):
        losses = iter([1.0, 2.0] if prefer == "global" else [2.0, 1.0])  # (global, uniform)
        monkeypatch.setattr(guard_mod, "masked_loss", lambda ctx, decide, windows: next(losses))
        model = tiny_model("llama", seed=6)
        ctx = _ctx_held(model)
        get_method("cap")(0.5, None, {**opts, "guard": "uniform", "guard_windows": "3"}).compress_model(ctx)
        g = ctx.extra["guard"]
        assert g["chosen"] == prefer and g["windows"] == 3
        assert [(a["rank_kept"], a["nnz_kept"]) for a in ctx.extra["allocation"]] == runs[want]
        assert sum(r.kept_params for r in ctx.records.values()) == ctx.extra["budget"]["achieved"] <= ctx.extra["budget"]["target"]


def test_guard_windows_are_drawn_after_the_calibration_windows():
    from capllm.data.calibration import sample_windows

    ids = torch.arange(5000)
    a = sample_windows(ids, 6, 32, 3)
    b = sample_windows(ids, 6 + 4, 32, 3)
    assert torch.equal(a, b[:6])  # adding held-out windows leaves the statistics' windows as they were


@pytest.mark.parametrize("method,refit", [("cap", "obs"), ("cap-uniform", "obs"), ("cap", "reselect")])
def test_two_four_structure_keeps_every_group_within_two(method, refit):
    """--structure 2:4: every compressed matrix's sparse part has at most 2 non-zeros in each group of
    4 consecutive inputs, through the selection, the guard's alternatives and the OBS refit (also
    when the refit re-chooses each group's survivors), and the budget is met as without a structure
    (fails if the pool is not restricted)."""
    from capllm.methods.base import Structure

    model = tiny_model("llama", seed=3)
    ctx = _ctx_held(model, n=4)
    opts = {"steps": "0", "rpca_max_iter": "60", "rpca_tol": "1e-5", "tune_epochs": "0", "refit": refit}
    get_method(method)(0.5, Structure.parse("2:4"), opts).compress_model(ctx)
    b = ctx.extra["budget"]
    assert b["achieved"] <= b["target"] and b["target"] - b["achieved"] < max(m + n for m, n in (h.shape for h in ctx.linears))
    from capllm.format.modules import LowRankSparseLinear

    for h in ctx.linears:
        mod = model.get_submodule(h.name)
        S = mod.S if isinstance(mod, LowRankSparseLinear) else mod.weight
        m, n = h.shape
        assert S is not None and int((S != 0).reshape(m, n // 4, 4).sum(-1).max()) <= 2, h.name
        assert ctx.records[h.name].nnz == int((S != 0).sum())
    assert sum(r.kept_params for r in ctx.records.values()) == b["achieved"]


def test_nm_candidates_against_a_direct_loop():
    from capllm.allocate.pools import nm_candidates

    g = torch.Generator().manual_seed(0)
    S = torch.randn(5, 11, generator=g) * (torch.rand(5, 11, generator=g) < 0.7)
    S[0, 4:8] = torch.tensor([1.0, -1.0, 1.0, 0.5])  # a tie: the earlier columns win
    a = torch.rand(11, generator=g) + 0.1
    a[4:8] = 1.0
    got = nm_candidates(S, a, 2, 4)
    want = torch.zeros(5, 11, dtype=torch.bool)
    for i in range(5):
        for g0 in range(0, 11, 4):
            cols = list(range(g0, min(g0 + 4, 11)))
            ranked = sorted(cols, key=lambda j: (-(float(S[i, j]) ** 2) * float(a[j]), j))
            for j in ranked[:2]:
                want[i, j] = True
    assert torch.equal(got, want)
    assert got[0, 4:8].tolist() == [True, True, False, False]



def test_with_a_structure_the_refit_reselects_unless_told_otherwise():
    from capllm.methods.base import Structure

    st = Structure.parse("2:4")
    assert get_method("cap")(0.5, st, {}).options.refit == "reselect"
    assert get_method("cap-uniform")(0.5, st, {}).options.refit == "reselect"
    assert get_method("cap")(0.5, st, {"refit": "obs"}).options.refit == "obs"
    assert get_method("cap")(0.5, None, {}).options.refit == "obs"


def test_reselect_with_a_structure_refuses_widths_it_cannot_tile_before_any_work():
    from capllm.errors import CapllmError
    from capllm.methods.base import Structure

    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    cfg = tiny_config("llama", 128)
    cfg.intermediate_size = 30  # down_proj takes 30 inputs: not a multiple of 4
    ctx = _ctx(AutoModelForCausalLM.from_config(cfg))
    with pytest.raises(CapllmError, match="down_proj has 30"):
        get_method("cap")(0.5, Structure.parse("2:4"), {"steps": "0"}).compress_model(ctx)
