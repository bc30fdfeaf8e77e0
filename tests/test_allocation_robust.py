"""CAP's allocation made safe across architectures (issue 13): the OBS entry score, the
block-scoped ranking and the guard over several alternative allocations."""

from __future__ import annotations

import pytest
import torch

from capllm.allocate.final_mask import greedy_fill
from capllm.allocate.pools import MatrixPool
from capllm.allocate.scores import matrix_importance
from capllm.methods.base import get_method
from capllm.solvers.obs import obs_entry_gain
from conftest import tiny_model
from test_backward import make_model
from test_cap import _ctx_held

OPTS = {"rpca_max_iter": "20", "rpca_tol": "1e-5"}


def test_obs_entry_gain_is_the_residual_variance_of_regressing_each_input_on_the_others():
    """1 / [H⁻¹]_jj = min_β E[(x_j − βᵀ x_{−j})²] (the output error of dropping w_j when the other
    weights of the row compensate), checked by least squares; dead inputs get 0."""
    g = torch.Generator().manual_seed(0)
    N, n = 4000, 6
    X = torch.randn(N, n, generator=g, dtype=torch.float64)
    X[:, 1] = X[:, 0] + 0.1 * torch.randn(N, generator=g, dtype=torch.float64)  # nearly a copy of input 0
    X[:, 4] = 0.0  # a dead input
    H = (X.t() @ X / N).float()
    gain = obs_entry_gain(H, percdamp=0.0).double()
    for j in range(n):
        if j == 4:
            assert gain[j] == 0
            continue
        others = [k for k in range(n) if k not in (j, 4)]
        beta = torch.linalg.lstsq(X[:, others], X[:, j : j + 1]).solution
        resid = float(((X[:, j : j + 1] - X[:, others] @ beta) ** 2).mean())
        assert float(gain[j]) == pytest.approx(resid, rel=2e-3)
    assert float(gain[0]) < 0.02 * float(H[0, 0]) and float(gain[2]) > 0.9 * float(H[2, 2])  # redundant inputs are cheap to drop
    # uncorrelated inputs: the gain is H_jj (+ the damping)
    D = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(obs_entry_gain(D, percdamp=0.01), torch.tensor([1.0, 2.0, 3.0]) + 0.02)


def _pool(seed: int, m: int = 5, n: int = 7, r: int = 2):
    """A small random pool (rank r, ~40 % sparse S) and random statistics for it."""
    g = torch.Generator().manual_seed(seed)
    U, V = torch.linalg.qr(torch.randn(m, r, generator=g))[0], torch.linalg.qr(torch.randn(n, r, generator=g))[0]
    S = torch.randn(m, n, generator=g) * (torch.rand(m, n, generator=g) < 0.4)
    p = MatrixPool("w", (m, n), U, torch.tensor([2.0, 1.0]), V, S)
    return p, S, g, torch.rand(r, generator=g), torch.rand(n, generator=g) + 0.5, torch.rand(m, generator=g)


def test_obs_entry_score_replaces_the_input_diagonal_for_entries_only():
    p, S, g, vcv, adiag, G = _pool(1)
    n = p.shape[1]
    gain = torch.rand(n, generator=g)
    kfac = matrix_importance(p, "fisher", vcv, adiag, G, "none")
    obs = matrix_importance(p, "fisher", vcv, adiag, G, "none", entry_gain=gain)
    torch.testing.assert_close(obs[: p.rank], kfac[: p.rank])  # directions unchanged
    sup = p.support()
    i, j = sup // n, sup % n
    want = 0.5 * S.view(-1)[sup].double() ** 2 * G.double()[i] * gain.double()[j]
    torch.testing.assert_close(obs[p.rank :].double(), want, rtol=1e-6, atol=0)


def test_diag_entry_score_is_half_the_squared_value_times_the_entrys_own_fisher():
    p, S, g, vcv, adiag, G = _pool(2)
    Fm = torch.rand(*p.shape, generator=g)
    kfac = matrix_importance(p, "fisher", vcv, adiag, G, "none")
    diag = matrix_importance(p, "fisher", vcv, adiag, G, "none", entry_fisher=Fm)
    torch.testing.assert_close(diag[: p.rank], kfac[: p.rank])  # directions unchanged
    sup = p.support()
    want = 0.5 * S.view(-1)[sup].double() ** 2 * Fm.double().view(-1)[sup]
    torch.testing.assert_close(diag[p.rank :].double(), want, rtol=1e-6, atol=0)
    # a rank-one F = G ⊗ diag A is K-FAC's entry score exactly
    torch.testing.assert_close(matrix_importance(p, "fisher", vcv, adiag, G, "none", entry_fisher=torch.outer(G, adiag)), kfac)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_the_fisher_stage_writes_the_entry_fisher_block_by_block_and_the_scores_drop_it(arch, tmp_path):
    from capllm.allocate.run import CapRun, open_store

    model = make_model(arch, seed=4)
    ctx = _ctx_held(model)
    ctx.calibration.windows.clamp_(max=model.config.vocab_size - 1)
    ctx.work_dir = tmp_path / "work"
    o = get_method("cap")(0.5, None, {**OPTS, "stage1_dir": str(tmp_path / "s1"), "entry_score": "diag"}).options
    with open_store(ctx) as store:
        run = CapRun(ctx, o, store)
        run.stage1(); run.fisher()
        assert len(list((store.root / "efisher").glob("block_*.safetensors"))) == model.config.num_hidden_layers
        G = store.grad()
        for h in ctx.linears:
            Fm = store.entry_fisher(h.block_index)[h.name]
            assert Fm.dtype == torch.bfloat16 and Fm.shape == h.shape and bool((Fm >= 0).all()), h.name
            assert float(Fm.float().sum()) > 0 and float(G[h.name].sum()) > 0, h.name
        run.scores("fisher", "none")
        assert not list((store.root / "efisher").glob("*.safetensors"))
        kfac_opts = get_method("cap")(0.5, None, {**OPTS, "stage1_dir": str(tmp_path / "s1")}).options
        diag_keys = [store.key(h.name) for h in ctx.linears]
    ctx2 = _ctx_held(make_model(arch, seed=4))
    ctx2.calibration.windows.clamp_(max=model.config.vocab_size - 1)
    with open_store(ctx2) as store:
        run = CapRun(ctx2, kfac_opts, store)
        run.stage1(); run.fisher(); run.scores("fisher", "none")
        kfac_keys = [store.key(h.name) for h in ctx2.linears]
    assert all(a.shape == b.shape for a, b in zip(diag_keys, kfac_keys))
    assert any(not torch.allclose(a, b, rtol=1e-2) for a, b in zip(diag_keys, kfac_keys))


def _run(model, opts, tmp_path, stop_after_select=True):
    from capllm.allocate.run import CapRun, open_store

    ctx = _ctx_held(model)
    o = get_method("cap")(0.5, None, {**OPTS, "stage1_dir": str(tmp_path / "s1"), **opts}).options
    with open_store(ctx) as store:
        run = CapRun(ctx, o, store)
        run.stage1(); run.fisher(); run.scores("fisher", "none")
        sel = run.select(run.budget(0.5), 0.5, float("inf"), o.scope)
        keys = [run.load_key(k) for k in range(len(ctx.linears))]
        segs = run.segments()
        keeps = [store.keep(h.name) for h in ctx.linears]
    return ctx, sel, keys, segs, keeps


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_block_scope_is_the_greedy_ranking_inside_each_block_at_its_own_share(arch, tmp_path):
    model = make_model(arch, seed=3)
    ctx, sel, keys, segs, keeps = _run(model, {"scope": "block"}, tmp_path)
    blocks: dict[int, list[int]] = {}
    for k, h in enumerate(ctx.linears):
        blocks.setdefault(h.block_index, []).append(k)
    assert len(blocks) == model.config.num_hidden_layers
    for ks in blocks.values():
        budget = int(0.5 * sum(ctx.linears[k].numel for k in ks))
        cost = torch.cat([segs[k].cost() for k in ks])
        want = greedy_fill(torch.cat([keys[k] for k in ks]), cost, budget)  # one sort over the block: the independent reference
        got = torch.cat([keeps[k] for k in ks])
        assert torch.equal(got, want)
        kept = int(cost[got].sum())
        assert budget - max(s.direction_cost for s in segs) < kept <= budget
    assert sel["selection"]["scope"] == "block"
    # the model-wide ranking allocates differently across blocks (else the test proves nothing)
    _, _, _, _, global_keeps = _run(make_model(arch, seed=3), {}, tmp_path)
    share = lambda kp: [sum(int(kp[k].sum()) for k in ks) for ks in blocks.values()]  # noqa: E731
    assert share(global_keeps) != share(keeps)


def test_guard_applies_the_alternative_of_lowest_loss(tmp_path, monkeypatch):
    """guard=block+uniform measures (global, block, uniform) and applies the lowest; a tie keeps the global one."""
    from capllm.allocate import guard as guard_mod

    ref = {}
    for tag, method, extra in (("global", "cap", {"guard": "none"}), ("block", "cap", {"scope": "block", "guard": "none"}), ("uniform", "cap-uniform", {})):
        ctx = _ctx_held(tiny_model("llama", seed=6))
        get_method(method)(0.5, None, {**OPTS, "stage1_dir": str(tmp_path / "s1"), **extra}).compress_model(ctx)
        ref[tag] = [(a["rank_kept"], a["nnz_kept"]) for a in ctx.extra["allocation"]]
    assert len({str(v) for v in ref.values()}) == 3
    for losses, want in (([3.0, 1.0, 2.0], "block"), ([3.0, 2.0, 1.0], "uniform"), ([1.0, 1.0, 2.0], "global")):
        it = iter(losses)
        monkeypatch.setattr(guard_mod, "masked_loss", lambda ctx, decide, windows: next(it))
        ctx = _ctx_held(tiny_model("llama", seed=6))
        get_method("cap")(0.5, None, {**OPTS, "stage1_dir": str(tmp_path / "s1"), "guard": "block+uniform", "guard_windows": "3"}).compress_model(ctx)
        g = ctx.extra["guard"]
        assert g["chosen"] == want and g["losses"] == dict(zip(("global", "block", "uniform"), losses))
        assert [(a["rank_kept"], a["nnz_kept"]) for a in ctx.extra["allocation"]] == ref[want]
        assert sum(r.kept_params for r in ctx.records.values()) == ctx.extra["budget"]["achieved"] <= ctx.extra["budget"]["target"]


def test_guard_mix_alternatives_lie_between_the_uniform_and_the_global_counts(tmp_path, monkeypatch):
    """guard=mix0.5 applies, in every matrix, a count half-way between its uniform share and the
    global selection's (to one candidate's cost), the same total budget, and the matrix's own
    top-key candidates; a bad α is a one-line error."""
    from capllm.allocate import guard as guard_mod
    from capllm.errors import CapllmError

    counts = {}
    for tag, method, extra in (("global", "cap", {"guard": "none"}), ("uniform", "cap-uniform", {})):
        ctx = _ctx_held(tiny_model("llama", seed=6))
        get_method(method)(0.5, None, {**OPTS, "stage1_dir": str(tmp_path / "s1"), **extra}).compress_model(ctx)
        counts[tag] = {n: r.kept_params for n, r in ctx.records.items()}
    assert counts["global"] != counts["uniform"]
    it = iter([2.0, 1.0])  # global, then mix0.5: the mix wins
    monkeypatch.setattr(guard_mod, "masked_loss", lambda ctx, decide, windows: next(it))
    ctx = _ctx_held(tiny_model("llama", seed=6))
    get_method("cap")(0.5, None, {**OPTS, "stage1_dir": str(tmp_path / "s1"), "guard": "mix0.5", "tune_epochs": "0"}).compress_model(ctx)
    assert ctx.extra["guard"]["chosen"] == "mix0.5"
    mixed = {n: r.kept_params for n, r in ctx.records.items()}
    gaps = []
    for n, k in mixed.items():
        want = 0.5 * counts["uniform"][n] + 0.5 * counts["global"][n]
        step = sum(ctx.records[n].shape)  # the greedy fill stops short of its target by less than one direction, m + n
        assert abs(k - want) <= step, n
        gaps.append(abs(counts["uniform"][n] - counts["global"][n]) / step)
    print("mix test: largest uniform–global gap", max(gaps), "directions")
    assert max(gaps) > 4  # the two ends differ by more than the tolerance: a wrong α would fail
    assert sum(mixed.values()) == ctx.extra["budget"]["achieved"] <= ctx.extra["budget"]["target"]
    assert any(mixed[n] not in (counts["uniform"][n], counts["global"][n]) for n in mixed)
    for bad in ("mix1.5", "mix", "mixx", "uniform+mix0"):
        with pytest.raises(CapllmError, match="mix"):
            get_method("cap")(0.5, None, {"guard": bad})


def test_the_default_guard_runs_when_there_are_held_out_windows_and_says_so_when_not(tmp_path, monkeypatch, capsys):
    """guard=auto (the default) is guard=uniform+mix0.25+mix0.5+mix0.75 on a run with held-out
    windows (the lowest held-out loss wins, here the planted mix0.5); without them the global
    allocation is applied with a one-line notice and a ``skipped`` record."""
    from capllm.allocate import guard as guard_mod

    it = iter([2.0, 1.5, 1.2, 1.0, 1.1])
    monkeypatch.setattr(guard_mod, "masked_loss", lambda ctx, decide, windows: next(it))
    ctx = _ctx_held(tiny_model("llama", seed=6))
    get_method("cap")(0.5, None, {**OPTS, "stage1_dir": str(tmp_path / "s1")}).compress_model(ctx)
    assert ctx.extra["guard"]["losses"] == {"global": 2.0, "uniform": 1.5, "mix0.25": 1.2, "mix0.5": 1.0, "mix0.75": 1.1}
    assert ctx.extra["guard"]["chosen"] == "mix0.5"
    from test_cap import _ctx

    ctx = _ctx(tiny_model("llama", seed=6))
    capsys.readouterr()
    get_method("cap")(0.5, None, {**OPTS, "stage1_dir": str(tmp_path / "s1")}).compress_model(ctx)
    assert ctx.extra["guard"]["chosen"] == "global" and "no held-out" in ctx.extra["guard"]["skipped"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "guard=auto" in err[0]
    # CAP's default block tuning needs 8 windows (this run has 4): skipped the same way, not an error
    assert "block tuning is skipped" in err[1] and "--nsamples ≥ 8" in err[1] and "skipped" in ctx.extra["block_tune"]
    assert get_method("cap")(0.5, None, {}).held_out_windows == 4  # every capllm compress run draws them


@pytest.mark.parametrize("entry", ["obs", "diag"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "opt", "opt-proj", "gemma3", "gpt_neox"])
def test_obs_scores_and_the_guard_run_on_every_architecture(arch, entry, tmp_path):
    model = make_model(arch, seed=4)
    ctx = _ctx_held(model)
    ctx.calibration.windows.clamp_(max=model.config.vocab_size - 1)
    ctx.work_dir = tmp_path / "work"
    get_method("cap")(0.5, None, {**OPTS, "stage1_dir": str(tmp_path / "s1"), "entry_score": entry, "guard": "block+uniform", "guard_windows": "3",
                                "calibrate": "block"}).compress_model(ctx)
    assert not list((tmp_path / "work" / "cap" / "efisher").glob("*.safetensors"))  # dropped once the scores are written
    b, g = ctx.extra["budget"], ctx.extra["guard"]
    cal = ctx.extra["calibration"]
    assert len(cal["factors"]) == model.config.num_hidden_layers and all(f > 0 for f in cal["factors"].values())
    assert b["achieved"] <= b["target"] and sum(r.kept_params for r in ctx.records.values()) == b["achieved"]
    assert set(g["losses"]) == {"global", "block", "uniform"} and g["chosen"] == min(g["losses"], key=g["losses"].get)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, model.config.vocab_size, (1, 12))).logits).all()


@pytest.mark.parametrize("bad, match", [({"entry_score": "x"}, "entry_score"), ({"entry_score": "obs", "score": "magnitude"}, "entry_score=obs"),
                                        ({"entry_score": "diag", "score": "activation"}, "entry_score=diag"),
                                        ({"guard": "block+x"}, "guard"), ({"scope": "layer"}, "scope"), ({"scope": "block", "spread": "0.2"}, "scope=block"),
                                        ({"refit_iters": "-1"}, "refit_iters"), ({"calibrate": "matrix"}, "calibrate"), ({"refit_iters": "5", "refit": "none"}, "refit_iters"),
                                        ({"refit": "greedy"}, "refit=")])
def test_bad_allocation_options_are_one_line_errors(bad, match):
    from capllm.errors import CapllmError

    with pytest.raises(CapllmError, match=match):  # when the method is built: before any work
        get_method("cap")(0.5, None, {**OPTS, **bad})
    with pytest.raises(CapllmError, match="cg_iters"):
        get_method("sparsegpt")(0.5, None, {"cg_iters": "-1"})


def test_support_cg_reaches_the_exact_least_squares_optimum_of_every_row():
    """Against a direct solve of H_SS w_S = (H r)_S per row (damped H); the objective never rises
    along the way, and 0 steps return the start."""
    from capllm.solvers.obs import sparsegpt_prune
    from capllm.solvers.support_lstsq import refine_on_support, support_objective

    g = torch.Generator().manual_seed(2)
    m, n, N = 12, 40, 400
    X = torch.randn(N, n, generator=g) @ torch.randn(n, n, generator=g) * torch.logspace(-1, 1, n)  # correlated, uneven scales
    H = X.t() @ X / N
    R = torch.randn(m, n, generator=g)
    mask = torch.rand(m, n, generator=g) < 0.5
    W0, keep, _ = sparsegpt_prune(R, H, 0.0, keep_mask=mask)
    W0 = W0 * keep
    Hd = H.double() + 0.01 * H.diagonal().mean().double() * torch.eye(n, dtype=torch.float64)
    want = torch.zeros(m, n, dtype=torch.float64)
    for i in range(m):
        S = mask[i].nonzero().squeeze(1)
        want[i, S] = torch.linalg.solve(Hd[S][:, S], (Hd @ R[i].double())[S])
    assert torch.equal(refine_on_support(W0, R, H, mask, 0), W0)
    prev = support_objective(W0, R, Hd)
    for iters in (2, 5, 10):
        Wk = refine_on_support(W0, R, H, mask, iters)
        obj = support_objective(Wk, R, Hd)
        assert (obj <= prev * (1 + 1e-5)).all() and not bool(Wk[~mask].any())
        prev = obj
    Wk = refine_on_support(W0, R, H, mask, 200)
    torch.testing.assert_close(Wk.double(), want, rtol=1e-3, atol=1e-4)
    opt = support_objective(want, R, Hd)
    assert float(support_objective(W0, R, Hd).sum()) > 1.01 * float(opt.sum())  # the OBS pass alone is not optimal here


def test_reselect_keeps_the_counts_and_reproduces_sparsegpt_on_its_own_mask():
    """refit=reselect's solver: given SparseGPT's own unstructured mask, it returns SparseGPT's
    weights and mask exactly; given a random mask, it keeps that mask's count in every column
    block and lands far below the fixed random support's output error."""
    from capllm.errors import CapllmError
    from capllm.solvers.obs import sparsegpt_prune
    from capllm.solvers.support_lstsq import support_objective

    g = torch.Generator().manual_seed(7)
    m, n, N, B = 24, 80, 600, 32
    X = torch.randn(N, n, generator=g) @ torch.randn(n, n, generator=g) * torch.logspace(-1, 1, n)
    H = X.t() @ X / N
    W = torch.randn(m, n, generator=g)
    Hd = H.double() + 0.01 * H.diagonal().mean().double() * torch.eye(n, dtype=torch.float64)
    Ws, keep_s, _ = sparsegpt_prune(W, H, 0.5, blocksize=B)
    Wr, keep_r, _ = sparsegpt_prune(W, H, 0.0, blocksize=B, keep_mask=keep_s, reselect=True)
    assert torch.equal(keep_r, keep_s) and torch.equal(Wr, Ws)

    mask = torch.rand(m, n, generator=g) < torch.linspace(0.2, 0.8, n)  # uneven density across column blocks
    Wf, keep_f, _ = sparsegpt_prune(W, H, 0.0, blocksize=B, keep_mask=mask)
    Wr, keep_r, _ = sparsegpt_prune(W, H, 0.0, blocksize=B, keep_mask=mask, reselect=True)
    assert torch.equal(keep_f, mask) and not torch.equal(keep_r, mask)
    for i1 in range(0, n, B):
        assert int(keep_r[:, i1:i1 + B].sum()) == int(mask[:, i1:i1 + B].sum())
    assert not bool(Wr[~keep_r].any())
    e_fixed, e_re = (float(support_objective((w * k).double(), W, Hd).sum()) for w, k in ((Wf, keep_f), (Wr, keep_r)))
    assert e_re < 0.8 * e_fixed
    with pytest.raises(CapllmError, match="reselect"):
        sparsegpt_prune(W, H, 0.5, reselect=True)


def test_cap_refit_reselect_keeps_every_matrixs_count_and_moves_its_support():
    """Through the engine on a tiny model: the same kept parameters and rank per matrix as
    refit=obs (the allocation's counts), with part of each support re-chosen."""
    out = {}
    for refit in ("obs", "reselect"):
        model = tiny_model("llama", seed=4)
        ctx = _ctx_held(model)
        get_method("cap")(0.5, None, {**OPTS, "refit": refit, "refit_iters": "0", "tune_epochs": "0"}).compress_model(ctx)
        out[refit] = {n: r for n, r in ctx.records.items()}
    assert out["obs"].keys() == out["reselect"].keys()
    for name, r in out["reselect"].items():
        assert (r.kept_params, r.rank) == (out["obs"][name].kept_params, out["obs"][name].rank), name
    moved = [r.info["support_moved"] for r in out["reselect"].values() if "support_moved" in r.info]
    assert moved and max(moved) > 0.05 and all(0 <= x <= 1 for x in moved)


def test_cap_refit_iters_lowers_every_layers_output_error():
    model = tiny_model("llama", seed=4)
    ctx = _ctx_held(model)
    get_method("cap")(0.5, None, {**OPTS, "refit_iters": "10"}).compress_model(ctx)
    infos = [r.info for r in ctx.records.values() if r.info.get("refit", "").startswith("obs+cg")]
    assert infos and all(i["output_error_cg"] <= i["output_error_obs"] * (1 + 1e-6) for i in infos)
    assert sum(i["output_error_cg"] for i in infos) < sum(i["output_error_obs"] for i in infos)


def test_sparsegpt_cg_iters_keeps_the_mask_and_lowers_the_output_error():
    from conftest import random_layer, run_layer_compressor
    from capllm.solvers.support_lstsq import support_objective

    W, X = random_layer(m=16, n=48, seed=3)
    H = (X.t() @ X / X.shape[0]).double()
    Hd = H + 0.01 * H.diagonal().mean() * torch.eye(48, dtype=torch.float64)
    out = {k: run_layer_compressor("sparsegpt", W, X, cg_iters=k) for k in ("0", "20")}
    assert torch.equal(out["0"].mask, out["20"].mask)
    e0, e1 = (float(support_objective(out[k].S, W, Hd).sum()) for k in ("0", "20"))
    assert e1 < e0


def test_masked_loss_substitutes_only_the_given_blocks(tmp_path):
    import copy

    import torch.nn.functional as F

    from capllm.allocate.guard import masked_loss
    from capllm.allocate.run import CapRun, open_store

    model = tiny_model("llama", seed=5)
    ctx = _ctx_held(model)
    o = get_method("cap")(0.5, None, {**OPTS, "stage1_dir": str(tmp_path / "s1")}).options
    w = ctx.calibration.held_out

    def loss_of(m):
        with torch.no_grad():
            logits = m(w).logits[:, :-1].float()
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1)))

    with open_store(ctx) as store:
        run = CapRun(ctx, o, store)
        run.stage1(); run.fisher(); run.scores("fisher", "none")
        run.select(run.budget(0.5), 0.5, float("inf"))
        assert masked_loss(ctx, run.decision, w, blocks=set()) == pytest.approx(loss_of(model), rel=1e-5)
        ref = copy.deepcopy(model)
        for h in ctx.linears:
            if h.block_index == 1:
                ref.get_submodule(h.name).weight.data = run.decision(h.name).dense()
        assert masked_loss(ctx, run.decision, w, blocks={1}) == pytest.approx(loss_of(ref), rel=1e-5)


def test_block_calibration_scales_each_blocks_keys_by_measured_over_predicted(tmp_path, monkeypatch):
    """Planted measurements: block 1's damage is 50× what its scores predict and block 0's is as
    predicted, so after calibration block 1 keeps more of the budget than before; the factors are
    M_b / P_b with P_b the summed key × cost of what the uniform split removes."""
    from capllm.allocate import guard as guard_mod
    from capllm.allocate.run import CapRun, open_store

    def shares(calibrate):
        model = tiny_model("llama", seed=6)
        ctx = _ctx_held(model)
        o = get_method("cap")(0.5, None, {**OPTS, "stage1_dir": str(tmp_path / "s1"), "calibrate": calibrate}).options
        with open_store(ctx) as store:
            run = CapRun(ctx, o, store)
            run.stage1(); run.fisher(); run.scores("fisher", "none")
            segs = run.segments()
            pred = {0: 0.0, 1: 0.0}
            for k, h in enumerate(ctx.linears):
                key = store.key(h.name)
                c = segs[k].cost().double()
                keep = greedy_fill(key, segs[k].cost().float(), int(0.5 * h.numel))
                pred[h.block_index] += float((key.double() * c)[~keep].sum())
            info = None
            if calibrate == "block":
                monkeypatch.setattr(guard_mod, "masked_loss", lambda ctx, decide, windows, blocks=None: 1.0 + (0 if not blocks else (pred[0] if blocks == {0} else 50 * pred[1])))
                info = run.calibrate(0.5, ctx.calibration.held_out)
            sel = run.select(run.budget(0.5), 0.5, float("inf"))
            kept = {0: 0, 1: 0}
            for a, h in zip(sel["allocation"], ctx.linears):
                kept[h.block_index] += a["kept_params"]
            return kept, info, pred

    before, _, _ = shares("none")
    after, info, pred = shares("block")
    assert info["factors"]["0"] == pytest.approx(1.0, rel=1e-5) and info["factors"]["1"] == pytest.approx(50.0, rel=1e-5)
    assert after[1] > before[1] and after[0] < before[0]


def test_the_disk_estimate_counts_the_entry_fisher_of_entry_score_diag():
    from capllm.models.layers import find_linears
    from capllm.workdir import disk_estimate

    model = tiny_model("llama")
    params = sum(h.numel for h in find_linears(model))
    kfac = disk_estimate(model, "cap", 8, 32, "none", stage1_cached=True)
    diag = disk_estimate(model, "cap", 8, 32, "none", stage1_cached=True, entry_fisher=True)
    assert "cap_entry_fisher" not in kfac and diag["cap_entry_fisher"] == 2 * params
    assert diag["total"] == kfac["total"] + 2 * params
