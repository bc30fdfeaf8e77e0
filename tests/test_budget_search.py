"""The per-block budget search of CAP's Stage 2 (issue 13, idea 2): the (1 + 1) level search on a
planted objective, the budget arithmetic of a block's level, and the search wired into ``cap``."""

from __future__ import annotations

import random

import pytest
import torch

from capllm.allocate.search import SearchConfig, level_search, level_share
from capllm.errors import CapllmError
from capllm.methods.base import get_method
from conftest import tiny_model
from test_cap import _ctx_held

OPTS = {"rpca_max_iter": "20", "rpca_tol": "1e-5", "tune_epochs": "0", "guard": "none", "stage1_dir": None}


def test_level_search_finds_a_planted_optimum_and_keeps_the_sum_and_the_bounds():
    """fitness = Σ (δ_b − t_b)² with Σ t = 0 on a grid of the step: the search reaches t exactly;
    every candidate it scores sums to zero and stays inside the bounds; the best only falls."""
    sizes = [100] * 5
    target = [-20, 10, 30, -10, -10]  # multiples of the step (0.1 × 100)
    lo, hi = [-25, -50, -50, -15, -50], [50, 50, 30, 50, 50]
    seen = []

    def fitness(d, pair):
        assert sum(d) == 0 and all(l <= x <= h for l, x, h in zip(lo, d, hi))
        seen.append(pair)
        return float(sum((x - t) ** 2 for x, t in zip(d, target)))

    accepted = []
    best, curve = level_search(sizes, lo, hi, fitness, SearchConfig(400, 0.1, seed=1), on_accept=lambda d, p: accepted.append(list(d)))
    assert best == target
    assert seen[0] == (-1, -1) and curve[0]["loss"] == 1600.0
    bests = [r["best"] for r in curve]
    assert all(b1 <= b0 for b0, b1 in zip(bests, bests[1:])) and bests[-1] == 0.0
    assert accepted[-1] == best and len(accepted) == sum(1 for r in curve[1:] if r["accepted"])
    assert any(r.get("skipped") for r in curve)  # block 0 at its bound -25 … -20 - 10 is refused, not clipped past
    with pytest.raises(CapllmError, match="two decoder blocks"):
        level_search([10], [0], [0], fitness, SearchConfig(3, 0.1))


def test_a_block_level_never_takes_the_model_over_its_budget():
    """Σ_k level_share(…) ≤ Σ_k n_k whenever Σ δ_b = 0 and −n_b ≤ δ_b ≤ R_b (its room); the loss to
    the floors is under one unit per matrix; a block at −n_b keeps nothing, one at R_b fills its pool."""
    rng = random.Random(0)
    for _ in range(300):
        blocks = [[(rng.randint(0, 50), rng.randint(50, 120)) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(2, 5))]
        base_b = [sum(n for n, _ in b) for b in blocks]
        room = [sum(p - n for n, p in b) for b in blocks]
        delta = [0] * len(blocks)
        for _ in range(5):
            a, b = rng.sample(range(len(blocks)), 2)
            d = rng.randint(0, min(base_b[a] + delta[a], room[b] - delta[b]))
            delta[a] -= d
            delta[b] += d
        shares = [[level_share(n, p, base_b[j], room[j], delta[j]) for n, p in blk] for j, blk in enumerate(blocks)]
        got = sum(map(sum, shares))
        assert sum(base_b) - sum(map(len, blocks)) < got <= sum(base_b)
        for j, blk in enumerate(blocks):
            assert all(0 <= s <= p for s, (_, p) in zip(shares[j], blk))
            assert sum(shares[j]) > base_b[j] + delta[j] - len(blk)
            if delta[j] == -base_b[j]:
                assert sum(shares[j]) == 0
            if delta[j] == room[j]:
                assert shares[j] == [p for _, p in blk]


def _kept_by_block(ctx):
    out = {}
    for h in ctx.linears:
        out[h.block_index] = out.get(h.block_index, 0) + ctx.records[h.name].kept_params
    return out


def test_cap_search_moves_budget_to_the_block_the_loss_rewards_and_checks_it_on_held_out_windows(tmp_path, monkeypatch):
    """A planted loss that rewards the weight mass kept in block 0: the search moves budget into
    block 0 (and out of the other), the budget is unchanged, and the result is applied because
    the held-out windows agree. With a held-out loss that punishes any change it is recorded but
    not applied: the allocation is the one without the search."""
    from capllm.allocate import guard as guard_mod

    opts = {**OPTS, "stage1_dir": str(tmp_path / "s1")}
    ctx0 = _ctx_held(tiny_model("llama", seed=6))
    get_method("cap")(0.5, None, opts).compress_model(ctx0)
    start = _kept_by_block(ctx0)

    def block0_mass(ctx, decide):
        return -sum(float(decide(h.name).dense().abs().sum()) for h in ctx.linears if h.block_index == 0)

    monkeypatch.setattr(guard_mod, "masked_loss", lambda ctx, decide, windows, **kw: block0_mass(ctx, decide))
    ctx = _ctx_held(tiny_model("llama", seed=6))
    get_method("cap")(0.5, None, {**opts, "search": "12", "search_step": "0.05", "search_windows": "2"}).compress_model(ctx)
    s = ctx.extra["search"]
    after = _kept_by_block(ctx)
    assert s["applied"] and s["accepted"] >= 1 and s["fit_best"] < s["fit_start"] and s["held_out_search"] < s["held_out_start"]
    assert after[0] > start[0] and after[1] < start[1]
    assert set(s["offsets"]) <= {"0", "1"} and s["offsets"]["0"] > 0
    b = ctx.extra["budget"]
    greedy_slack = sum(sum(h.shape) for h in ctx.linears)  # each matrix's fill stops short by under one direction
    assert sum(after.values()) == b["achieved"] <= b["target"] and b["target"] - b["achieved"] < greedy_slack
    assert s["windows"] == 2 and len(s["curve"]) == 13

    def disagree(ctx, decide, windows, **kw):  # the held-out windows (3 in _ctx_held) punish what the search windows (2) reward
        return -block0_mass(ctx, decide) if windows.shape[0] == 3 else block0_mass(ctx, decide)

    monkeypatch.setattr(guard_mod, "masked_loss", disagree)
    ctx = _ctx_held(tiny_model("llama", seed=6))
    get_method("cap")(0.5, None, {**opts, "search": "12", "search_step": "0.05", "search_windows": "2", "guard_windows": "3"}).compress_model(ctx)
    s = ctx.extra["search"]
    assert s["accepted"] >= 1 and not s["applied"] and s["held_out_search"] > s["held_out_start"]
    assert _kept_by_block(ctx) == start
    # search_check=none applies it regardless (and still records both held-out losses)
    ctx = _ctx_held(tiny_model("llama", seed=6))
    get_method("cap")(0.5, None, {**opts, "search": "12", "search_step": "0.05", "search_windows": "2", "guard_windows": "3",
                                  "search_check": "none"}).compress_model(ctx)
    s = ctx.extra["search"]
    assert s["applied"] and not s["checked"] and s["held_out_search"] > s["held_out_start"] and _kept_by_block(ctx)[0] > start[0]


def test_cap_search_with_the_real_loss_reports_the_loss_of_the_mask_it_applies(tmp_path):
    """With the real masked-model loss: the best fitness in the record is the loss of the final mask
    (recomputed directly on the same windows), the run is deterministic, and bad options are refused."""
    from capllm.allocate.guard import masked_loss
    from capllm.allocate.run import CapRun, open_store

    opts = {**OPTS, "stage1_dir": str(tmp_path / "s1"), "search": "8", "search_step": "0.02", "search_windows": "2", "refit": "none"}
    recs = []
    for _ in range(2):
        ctx = _ctx_held(tiny_model("llama", seed=6))
        ctx.work_dir = tmp_path / f"w{len(recs)}"
        m = get_method("cap")(0.5, None, opts)
        m.compress_model(ctx)
        recs.append(ctx.extra["search"])
    assert recs[0] == recs[1]
    s = recs[0]
    print("search record", {k: v for k, v in s.items() if k != "curve"})
    assert s["accepted"] >= 1 and s["fit_best"] < s["fit_start"]  # a candidate scored with its own masks won (else nothing is tested)
    ctx = _ctx_held(tiny_model("llama", seed=6))
    ctx.work_dir = tmp_path / "w0"
    with open_store(ctx) as store:
        run = CapRun(ctx, m.options, store)
        run.stage1()
        kind = "keep" if s["applied"] else "keep-search"
        got = masked_loss(ctx, lambda n: run.decision(n, kind=kind), ctx.calibration.windows[:2])
    assert got == pytest.approx(s["fit_best"], rel=1e-6)
    for bad in ({"search": "-1"}, {"search_step": "0"}, {"search_step": "1.5"}, {"search_windows": "0"}, {"search_check": "yes"}):
        with pytest.raises(CapllmError, match="search"):
            get_method("cap")(0.5, None, bad)


def test_each_candidate_scored_from_the_saved_block_inputs_equals_the_whole_forward(tmp_path, monkeypatch):
    """The search starts each candidate at its first changed block from the best's saved inputs:
    on a 5-block model every such loss equals the masked model's whole forward, bit for bit,
    through accepted and rejected candidates alike."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from capllm.allocate import guard as guard_mod

    real = guard_mod.masked_loss
    checked = []

    def both(ctx, decide, windows, **kw):
        got = real(ctx, decide, windows, **kw)
        if kw.get("start"):
            checked.append((kw["start"], got))
            assert got == real(ctx, decide, windows), kw["start"]
        return got

    monkeypatch.setattr(guard_mod, "masked_loss", both)
    torch.manual_seed(2)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, vocab_size=128)
    ctx = _ctx_held(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval())
    get_method("cap")(0.5, None, {**OPTS, "stage1_dir": str(tmp_path / "s1"), "search": "16", "search_step": "0.05",
                                  "search_windows": "2"}).compress_model(ctx)
    s = ctx.extra["search"]
    assert len(checked) >= 8 and len({b for b, _ in checked}) >= 2 and s["accepted"] >= 2
