"""CAP Stage 1: robust PCA — planted recovery, fast path == reference, batching, activation-aware
un-scaling, the resumable cache, the CLI and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from capllm.cli.main import main
from capllm.decompose import RPCAConfig, decompose_in_memory, decompose_model, iter_decompositions, load_decomposition, rpca, rpca_batched
from capllm.decompose import cache as cache_mod
from capllm.decompose.reference import rpca_reference
from capllm.errors import CapllmError
from tests.conftest import tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    """These matrices are small: one intra-op thread is faster (and immune to a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def planted(m: int, n: int, rank_frac: float = 0.05, sparse_frac: float = 0.05, seed: int = 0):
    """W = L0 + S0: rank(L0) = rank_frac·min(m, n); S0 has sparse_frac of its entries with
    random signs and magnitudes uniform in [1, 3] (L0 entries are ~N(0, 1))."""
    g = torch.Generator().manual_seed(seed)
    r = max(1, round(rank_frac * min(m, n)))
    L0 = torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g, dtype=torch.float64) / math.sqrt(r)
    support = torch.rand(m, n, generator=g) < sparse_frac
    mag = 1 + 2 * torch.rand(m, n, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(m, n, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    S0 = torch.where(support, mag * sign, torch.zeros((), dtype=torch.float64))
    return L0, S0, r


def weight_like(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A dense, heavy-tailed, full-rank matrix like a trained weight (RPCA gives high-rank L, dense S)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g) / 4
    noise = torch.randn(m, n, generator=g) * torch.rand(m, n, generator=g) ** 3  # heavy-tailed entries
    return (base + noise).float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def check_planted_recovery(m: int, n: int) -> None:
    """Issue 3 acceptance: rank(L0) = 5 % of n, 5 % of entries in S0 -> L0 and S0 to < 1e-3."""
    L0, S0, r = planted(m, n)
    res = rpca((L0 + S0).float())
    assert res.converged and res.residual < 1e-7
    assert res.rank == r
    assert rel(res.L(), L0) < 1e-3 and rel(res.S, S0) < 1e-3
    assert torch.equal(res.S != 0, S0 != 0)  # the support exactly
    # factors: U orthonormal, σ descending, V orthonormal
    assert torch.allclose(res.U.T @ res.U, torch.eye(r), atol=1e-5)
    assert torch.allclose(res.V.T @ res.V, torch.eye(r), atol=1e-5)
    assert bool((res.sigma[:-1] >= res.sigma[1:]).all())
    assert "partial" in {h["svd"] for h in res.history}  # the rank-predicted partial step ran


@pytest.mark.parametrize("m, n", [(256, 256), (192, 320), (512, 512), (384, 640)])
def test_planted_problem_is_recovered(m, n):
    check_planted_recovery(m, n)


@pytest.mark.slow
def test_planted_problem_is_recovered_at_1024():
    check_planted_recovery(1024, 1024)


@pytest.mark.parametrize("shape", [(96, 160), (160, 96)])
def test_fast_paths_match_the_full_svd_reference(shape):
    W = weight_like(*shape)
    ref = rpca_reference(W)
    assert ref["converged"]
    for mode in ("auto", "gram", "full"):
        res = rpca(W, svd=mode)
        assert res.iterations == ref["iterations"] and res.converged
        assert res.rank == ref["ranks"][-1]
        assert rel(res.L(), ref["L"]) < 1e-6 and rel(res.S, ref["S"]) < 1e-6, mode
        assert abs(res.nnz - int((ref["S"] != 0).sum())) <= 1e-4 * W.numel()
    assert 0.2 < res.rank / min(shape) < 1.0 and res.nnz > 0.2 * W.numel()  # a realistic, non-trivial split


def test_partial_step_matches_full_on_a_planted_problem():
    L0, S0, _ = planted(200, 240, seed=3)
    W = (L0 + S0).float()
    fast, full = rpca(W, svd="partial"), rpca(W, svd="full")
    kinds = [h["svd"] for h in fast.history]
    assert "partial" in kinds and all(h["svd"] == "full" for h in full.history)
    assert rel(fast.L(), full.L()) < 1e-6 and rel(fast.S, full.S) < 1e-6
    assert [h["rank"] for h in fast.history] == [h["rank"] for h in full.history]


def test_batched_equals_unbatched():
    Ws = torch.stack([weight_like(64, 96, seed=s) * (s + 1) for s in range(3)])
    batched = rpca_batched(Ws)
    for W, b in zip(Ws, batched):
        one = rpca(W)
        assert b.iterations == one.iterations and b.rank == one.rank and b.nnz == one.nnz
        assert rel(b.L(), one.L()) < 1e-6 and rel(b.S, one.S) < 1e-6
        assert [(h["rank"], h["nnz"]) for h in b.history] == [(h["rank"], h["nnz"]) for h in one.history]
        assert [h["residual"] for h in b.history] == pytest.approx([h["residual"] for h in one.history], rel=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_gram_and_eigh_kernels_match_a_direct_computation(threads):
    """On one intra-op thread the CPU SVT kernels go through NumPy (syrk, syevd), on more through
    torch; check both against a direct computation."""
    from capllm.decompose.svt import _numpy_kernels, eigh, gram, spectrum_gram

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        X = torch.randn(2, 70, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        X[1] *= 1e3  # scale does not matter
        assert _numpy_kernels(X) == (threads == 1)
        G = gram(X.float())
        direct = X.float().double().mT @ X.float().double()
        assert G.dtype == torch.float64 and G.shape == (2, 40, 40)
        assert torch.equal(G, G.mT)  # exactly symmetric
        assert torch.allclose(G, direct, rtol=1e-12, atol=1e-9)
        w, V = eigh(G)
        w_ref = torch.linalg.eigvalsh(direct)
        assert torch.allclose(w, w_ref, rtol=1e-10, atol=1e-8 * float(w_ref.abs().max()))
        assert torch.allclose(V @ torch.diag_embed(w) @ V.mT, G, rtol=0, atol=1e-10 * float(G.abs().max()))
        spec = spectrum_gram(X)
        assert torch.allclose(spec.sigma, torch.linalg.svdvals(X), rtol=1e-9, atol=1e-9 * float(spec.sigma.max()))
    finally:
        torch.set_num_threads(old)


def test_worker_threads_limit_numpy_blas_like_torch(monkeypatch):
    """map_in_threads gives NumPy's BLAS the per-worker thread count (no oversubscription)."""
    from threadpoolctl import threadpool_info

    from capllm.decompose.rpca import map_in_threads

    def blas_threads(_):
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas" and "openblas" in i["internal_api"]}, torch.get_num_threads()

    old = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        seen = [r for _, r in map_in_threads(blas_threads, [0, 1, 2, 3], workers=4)]
    finally:
        torch.set_num_threads(old)
    assert all(blas == {1} and t == 1 for blas, t in seen)


def test_activation_aware_unscaling_is_exact():
    g = torch.Generator().manual_seed(1)
    W = weight_like(80, 64, seed=2)
    d = torch.rand(64, generator=g) * 3 + 0.05
    res = rpca(W, col_scale=d)
    assert res.converged
    assert rel(res.L() + res.S, W) < 1e-6
    # the decomposition of W·diag(d), un-scaled: V absorbs 1/d, S is divided column-wise
    scaled = rpca(W * d)
    assert torch.allclose(res.sigma, scaled.sigma, rtol=1e-5)
    assert rel(res.L() * d, scaled.L()) < 1e-5 and rel(res.S * d, scaled.S) < 1e-5
    assert torch.allclose((res.V * d.unsqueeze(1)).norm(dim=0), torch.ones(res.rank), atol=1e-5)
    assert res.history[-1]["rank"] == scaled.history[-1]["rank"]


def test_iteration_cap_and_history():
    W = weight_like(48, 40)
    res = rpca(W, max_iter=3)
    assert res.iterations == 3 and not res.converged and len(res.history) == 3
    h = res.history
    assert all(set(x) >= {"rank", "nnz", "residual", "mu", "svd"} for x in h)
    assert h[1]["mu"] == pytest.approx(1.5 * h[0]["mu"]) and h[0]["mu"] == pytest.approx(1.25 / float(torch.linalg.matrix_norm(W.double(), 2)))
    assert res.lam == pytest.approx(1 / math.sqrt(48))
    assert rpca(W, lam_scale=2.0, max_iter=1).lam == pytest.approx(2 / math.sqrt(48))
    # the residual reported is the iterate's own ‖W − L − S‖/‖W‖ (fp32 outputs add only rounding)
    assert rel(res.L() + res.S, W) == pytest.approx(res.residual, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize(
    "W, needle",
    [
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "NaN/Inf"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), "NaN/Inf"),
        (torch.zeros(0, 4), "empty"),
        (torch.ones(5), "2-D"),
        (torch.ones(2, 3, 4), "2-D"),
        (torch.ones(3, 3, dtype=torch.int64), "floating-point"),
        ([[1.0, 2.0]], "torch.Tensor"),
        (torch.tensor(1.0), "2-D"),
        (torch.ones(3, 3, dtype=torch.bool), "floating-point"),
        (torch.ones(3, 3, dtype=torch.complex64), "floating-point"),
        (torch.full((3, 3), float("-inf")), "9 NaN/Inf"),
    ],
)
def test_bad_input_is_a_clear_error(W, needle):
    with pytest.raises(CapllmError, match=needle.replace("/", ".")):
        rpca(W)


@pytest.mark.parametrize(
    "Ws, needle",
    [
        (torch.ones(2, 4, 4).index_put_((torch.tensor([1]), torch.tensor([2]), torch.tensor([3])), torch.tensor(float("nan"))), "NaN/Inf"),
        (torch.zeros(0, 4, 4), "empty"),
        (torch.zeros(2, 0, 4), "empty"),
        (torch.ones(2, 3, 3, dtype=torch.int32), "floating-point"),
        (torch.ones(4, 4), "3-D"),
    ],
)
def test_bad_input_to_the_batched_form(Ws, needle):
    with pytest.raises(CapllmError, match=needle.replace("/", ".")):
        rpca_batched(Ws)


def test_half_precision_input_is_accepted():
    W = weight_like(40, 24)
    for dt in (torch.float16, torch.bfloat16):
        Wh = W.to(dt)
        res, want = rpca(Wh), rpca(Wh.float())
        assert res.S.dtype == torch.float32 and res.converged
        assert rel(res.L(), want.L()) < 1e-6 and rel(res.S, want.S) < 1e-6


def test_model_with_a_nan_weight_names_the_layer_before_any_work(tmp_path, monkeypatch):
    from capllm.models.layers import find_linears

    model = tiny_model("llama")
    h = find_linears(model)[5]
    with torch.no_grad():
        h.module.weight[0, 0] = float("nan")
    monkeypatch.setattr(cache_mod, "rpca_batched", lambda *a, **k: pytest.fail("decomposed before checking the weights"))
    with pytest.raises(CapllmError, match=f"{h.name} has 1 NaN/Inf"):
        decompose_in_memory(model, RPCAConfig(max_iter=2))
    with pytest.raises(CapllmError, match=f"{h.name} has 1 NaN/Inf"):
        decompose_model(model, RPCAConfig(max_iter=2), tmp_path / "out", progress=False)


def test_degenerate_shapes_and_zero_matrices():
    for W in (torch.tensor([[2.0]]), torch.randn(1, 5), torch.randn(7, 1), torch.randn(3, 3, dtype=torch.float64)):
        r = rpca(W)
        assert r.converged and rel(r.dense(), W) < 1e-6
    z = rpca(torch.zeros(4, 6))
    assert z.converged and z.iterations == 0 and z.rank == 0 and z.nnz == 0 and z.L().shape == (4, 6)
    mixed = rpca_batched(torch.stack([torch.zeros(5, 4), torch.randn(5, 4)]))
    assert mixed[0].iterations == 0 and mixed[1].converged and mixed[1].iterations > 0


def test_bad_options_are_clear_errors():
    W = torch.randn(8, 8)
    with pytest.raises(CapllmError, match="svd mode"):
        rpca(W, svd="magic")
    with pytest.raises(CapllmError, match="col_scale"):
        rpca(W, col_scale=torch.ones(7))
    with pytest.raises(CapllmError, match="col_scale"):
        rpca(W, col_scale=-torch.ones(8))
    with pytest.raises(CapllmError, match="either config"):
        rpca(W, config=RPCAConfig(), tol=1e-3)
    with pytest.raises(CapllmError, match="3-D"):
        rpca_batched(W)


# ---------------------------------------------------------------------------------------------
# whole model: cache, resume, config mismatch


def test_decompose_model_cache_resume_and_mismatch(tmp_path, monkeypatch):
    model = tiny_model("llama")
    cfg = RPCAConfig(max_iter=8)
    mem = decompose_in_memory(model, cfg)
    names = list(mem)
    assert len(names) == 14

    out = tmp_path / "rpca"
    # a run killed after a few matrices: only their files + manifest entries exist
    decompose_model(model, cfg, out, names=names[:5], progress=False)
    man = json.loads((out / "manifest.json").read_text())
    assert list(man["matrices"]) == names[:5]
    (out / ".junk.safetensors.tmp").write_text("half a file from a killed writer")

    calls = []
    real = cache_mod.rpca_batched
    monkeypatch.setattr(cache_mod, "rpca_batched", lambda Ws, **kw: calls.append(Ws.shape[0]) or real(Ws, **kw))
    man = decompose_model(model, cfg, out, progress=False)
    assert sum(calls) == len(names) - 5  # finished matrices were skipped
    assert list(man["matrices"]) == names
    for name, res in iter_decompositions(out):
        ref = mem[name]
        assert torch.equal(res.S, ref.S) and torch.equal(res.U, ref.U) and torch.equal(res.sigma, ref.sigma)
        assert res.iterations == ref.iterations and res.history == ref.history
        e = man["matrices"][name]
        assert e["rank"] == ref.rank and e["nnz"] == ref.nnz and e["shape"] == list(ref.S.shape)

    calls.clear()
    decompose_model(model, cfg, out, progress=False)  # everything done: nothing recomputed
    assert calls == []
    with pytest.raises(CapllmError, match="different configuration.*lam_scale"):
        decompose_model(model, RPCAConfig(max_iter=8, lam_scale=2.0), out, progress=False)
    with pytest.raises(CapllmError, match="no decomposition of"):
        load_decomposition(out, "model.layers.9.mlp.up_proj")


def test_batched_model_run_equals_unbatched():
    model = tiny_model("llama")
    cfg = RPCAConfig(max_iter=6)
    one, many = decompose_in_memory(model, cfg), decompose_in_memory(model, cfg, batch=4)
    for name in one:
        assert rel(one[name].L(), many[name].L()) < 1e-6 and rel(one[name].S, many[name].S) < 1e-6


def test_collect_input_stats_matches_direct_computation():
    from capllm.engine.collect import collect_input_stats

    model = tiny_model("llama")
    windows = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    stats = collect_input_stats(model, windows, "cpu")
    # independent: the input of block 1's q_proj is input_layernorm(hidden state after block 0)
    with torch.no_grad():
        hs = torch.cat([model(w.unsqueeze(0), output_hidden_states=True).hidden_states[1] for w in windows], dim=1)
        x = model.model.layers[1].input_layernorm(hs)
    want = x.reshape(-1, x.shape[-1]).double().pow(2).mean(0)
    got = stats["model.layers.1.self_attn.q_proj"].sq
    assert torch.allclose(got, want, rtol=1e-5)
    assert stats["model.layers.1.self_attn.q_proj"].tokens == 48


def test_cli_decompose_resume_and_act_aware(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "dec"
    rc = main(["decompose", "--model", str(tiny_model_dir), "--out", str(out), "--max-iter", "5", "--quiet"])
    assert rc == 0
    man = json.loads((out / "manifest.json").read_text())
    assert len(man["matrices"]) == 14 and man["config"]["rpca"]["max_iter"] == 5 and man["config"]["activation_aware"] is None
    assert all(m["iterations"] == 5 for m in man["matrices"].values())
    rc = main(["decompose", "--model", str(tiny_model_dir), "--out", str(out), "--max-iter", "6", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "different configuration" in err and "max_iter" in err

    out2 = tmp_path / "dec-aa"
    rc = main(["decompose", "--model", str(tiny_model_dir), "--out", str(out2), "--max-iter", "5", "--act-aware",
               "--calib", str(text_file), "--nsamples", "2", "--seqlen", "32", "--quiet"])
    assert rc == 0
    man = json.loads((out2 / "manifest.json").read_text())
    assert man["config"]["activation_aware"]["calibration"]["nsamples"] == 2
    res = load_decomposition(out2, "model.layers.0.mlp.down_proj")
    assert res.S.shape == (64, 128) and res.V.shape[0] == 128


def test_col_scales_config_tolerates_noise_but_not_a_change(tmp_path):
    from capllm.models.layers import find_linears

    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    scales = {h.name: torch.rand(h.shape[1], generator=g) + 0.5 for h in find_linears(model)}
    cfg = RPCAConfig(max_iter=4)
    out = tmp_path / "aa"
    names = list(scales)
    decompose_model(model, cfg, out, col_scales=scales, names=names[:2], progress=False)
    noisy = {k: v * (1 + 1e-7) for k, v in scales.items()}  # recomputed statistics: last-bit noise
    man = decompose_model(model, cfg, out, col_scales=noisy, progress=False)
    assert len(man["matrices"]) == len(names)
    res = load_decomposition(out, names[0])
    W = find_linears(model)[0].weight_copy()
    assert rel(res.L() + res.S, W) < 0.2 and rel(res.L() * scales[names[0]], rpca(W * scales[names[0]], max_iter=4).L()) < 1e-5
    changed = {k: v * 1.01 for k, v in scales.items()}
    with pytest.raises(CapllmError, match="different configuration"):
        decompose_model(model, cfg, out, col_scales=changed, progress=False)
    with pytest.raises(CapllmError, match="different configuration"):
        decompose_model(model, cfg, out, progress=False)  # not activation-aware
    with pytest.raises(CapllmError, match="inputs"):
        decompose_model(model, cfg, tmp_path / "bad", col_scales={k: v[:-1] for k, v in scales.items()}, progress=False)


@pytest.mark.slow
def test_real_smollm2_weights_match_the_reference_and_the_design_facts():
    """DESIGN §1: default-λ RPCA of SmolLM2-135M weights takes 33–39 iterations to 1e-7, rank(L)
    is 60–73 % of full and S has 60–74 % non-zeros (measured with the full-SVD reference)."""
    import capllm
    from capllm.models.layers import find_linears

    model, _ = capllm.load_model("smollm2-135m")
    handles = {h.name: h for h in find_linears(model)}
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.15.self_attn.q_proj"):
        W = handles[name].weight_copy()
        res = rpca(W)
        assert res.converged and 33 <= res.iterations <= 39
        assert 0.55 <= res.rank / min(W.shape) <= 0.75 and 0.55 <= res.nnz / W.numel() <= 0.78
        ref = rpca_reference(W)
        assert ref["iterations"] == res.iterations and ref["ranks"][-1] == res.rank
        assert rel(res.L(), ref["L"]) < 1e-6 and rel(res.S, ref["S"]) < 1e-6
