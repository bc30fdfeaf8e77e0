"""Several processes, one compression (torchrun, gloo on a CPU): the result does not depend on
the number of ranks — same masks, same kept counts, values equal to float rounding — and the
perplexity, whose per-window losses are gathered, is the same figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import capllm

SRC = Path(capllm.__file__).resolve().parents[1]


def _args(model_dir: Path, text: Path, out: Path, method: str, extra=()) -> list[str]:
    return ["compress", "--model", str(model_dir), "--method", method, "--ratio", "0.5", "--calib", str(text), "--nsamples", "4",
            "--seqlen", "24", "--dataset", str(text), "--eval-seqlen", "24", "--max-windows", "5", "--out", str(out), "--quiet", "--device", "cpu", *extra]


def _launch(args: list[str], nproc: int, script: Path | None = None) -> subprocess.CompletedProcess:
    """``capllm`` (or ``script``, which calls capllm's main) on ``nproc`` processes via torchrun."""
    target = [str(script)] if script is not None else ["-m", "capllm"]
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 or script else []) + target + args
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(launch, capture_output=True, text=True, env=env, timeout=600)


def _compress(model_dir: Path, text: Path, out: Path, method: str, nproc: int, extra: list[str] = ()) -> subprocess.CompletedProcess:
    return _launch(_args(model_dir, text, out, method, extra), nproc)


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            got.update({k: sf.get_tensor(k) for k in sf.keys()})
    return got


TUNE = ["--option", "tune_epochs=2", "--option", "tune_hold_out=4", "--option", "tune_batch=2", "--option", "tune_lr=5e-3"]


@pytest.mark.parametrize("method,extra", [("wanda", []), ("sparsegpt", []), ("sparsegpt", TUNE)], ids=["wanda", "sparsegpt", "sparsegpt-tuned"])
def test_two_ranks_give_the_one_process_result(tiny_model_dir, text_file, tmp_path, method, extra):
    """``sparsegpt-tuned``: block tuning's batches straddle the ranks (windows 0–1 on rank 0,
    2–3 on rank 1, batches of 2 in a seeded order), its gradients summed over them."""
    runs = {}
    for n in (1, 2):
        proc = _compress(tiny_model_dir, text_file, tmp_path / f"n{n}", method, n, extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[n] = json.loads((tmp_path / f"n{n}" / "result.json").read_text())
    one, two = runs[1], runs[2]
    assert two["distributed"] == {"world_size": 2, "backend": "gloo"} and one["distributed"]["world_size"] == 1
    assert len(two["peak_rss_mb_by_rank"]) == 2
    assert [r["kept_params"] for r in one["layers"]] == [r["kept_params"] for r in two["layers"]]
    assert one["params"] == two["params"]
    assert two["perplexity_dense"]["mean_nll"] == one["perplexity_dense"]["mean_nll"]  # the same windows, each scored alike
    assert two["perplexity"]["mean_nll"] == pytest.approx(one["perplexity"]["mean_nll"], rel=1e-5)
    a, b = _tensors(tmp_path / "n1"), _tensors(tmp_path / "n2")
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            assert a[k].shape == b[k].shape and torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-5), k
        else:
            assert torch.equal(a[k], b[k]), k  # the packed masks: identical
    if extra:  # the tuning ran on both, to the same epochs and held-out errors
        tuned = [[r["block_tune"] for r in run["layers"] if "block_tune" in r] for run in (one, two)]
        assert len(tuned[0]) == len(tuned[1]) == 2 and all(t["epochs_run"] == 2 for t in tuned[1])
        assert [t["kept_epoch"] for t in tuned[0]] == [t["kept_epoch"] for t in tuned[1]]
        for t1, t2 in zip(*tuned):
            assert t2["held_out_before"] == pytest.approx(t1["held_out_before"], rel=1e-5)


def test_cap_on_two_ranks_gives_the_one_process_result(tiny_model_dir, text_file, tmp_path):
    """CAP's stages on two ranks: statistics and Fisher moments reduced over both ranks' windows,
    Stage 1, scores and the selection on rank 0, the refit divided by matrix. With the Stage 1
    cache of the one-process run, the kept allocation is the same and the values agree to
    float rounding."""
    extra = ["--option", "rpca_max_iter=8", "--option", f"stage1_dir={tmp_path / 's1'}"]
    runs = {}
    for n in (1, 2):
        proc = _compress(tiny_model_dir, text_file, tmp_path / f"n{n}", "cap", n, extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[n] = json.loads((tmp_path / f"n{n}" / "result.json").read_text())
    one, two = runs[1], runs[2]
    assert two["distributed"]["world_size"] == 2
    assert [(r["rank"], r["nnz"], r["kept_params"]) for r in one["layers"]] == [(r["rank"], r["nnz"], r["kept_params"]) for r in two["layers"]]
    assert one["method_results"]["budget"] == two["method_results"]["budget"]
    assert two["perplexity"]["mean_nll"] == pytest.approx(one["perplexity"]["mean_nll"], rel=1e-4)
    a, b = _tensors(tmp_path / "n1"), _tensors(tmp_path / "n2")
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-4), k
        else:
            assert torch.equal(a[k], b[k]), k


def test_the_policy_is_refused_on_several_ranks(tiny_model_dir, text_file, tmp_path):
    proc = _compress(tiny_model_dir, text_file, tmp_path / "cap", "cap", 2, ["--option", "steps=1"])
    assert proc.returncode != 0
    assert "runs in one process" in proc.stderr


_DYING = '''
import os, sys
import torch.distributed
from capllm.engine import checkpoint
real = checkpoint.PassCheckpoint.drop_hidden
def dying(self, i):
    if os.environ.get("RANK") == "1":  # after block 0 is marked done: rank 1 dies
        os._exit(137)  # what kill -9 leaves: no cleanup, no flush
    return real(self, i)
checkpoint.PassCheckpoint.drop_hidden = dying
from capllm.cli.main import main
sys.exit(main(sys.argv[1:]))
'''


def test_a_rank_that_dies_ends_the_run_and_the_rerun_resumes(tiny_model_dir, text_file, tmp_path):
    """Rank 1 dies in the middle of the pass: the run stops with a non-zero exit (torchrun ends
    the other rank), and the same command resumes from the last finished block to the result of
    an uninterrupted two-rank run."""
    ref = _compress(tiny_model_dir, text_file, tmp_path / "ref", "sparsegpt", 2)
    assert ref.returncode == 0, ref.stderr[-3000:]
    script = tmp_path / "dying.py"
    script.write_text(_DYING)
    out = tmp_path / "run"
    died = _launch(_args(tiny_model_dir, text_file, out, "sparsegpt"), 2, script)
    assert died.returncode != 0 and not out.exists()
    state = json.loads((out.parent / "run.work" / "compress" / "passes" / "sparsegpt" / "state.json").read_text())
    assert 0 <= state["done"] < state["blocks"] - 1  # stopped part-way
    again = _compress(tiny_model_dir, text_file, out, "sparsegpt", 2)
    assert again.returncode == 0, again.stderr[-3000:]
    r, a = json.loads((tmp_path / "ref" / "result.json").read_text()), json.loads((out / "result.json").read_text())
    assert a["attempts"] == 2
    assert a["perplexity"]["mean_nll"] == r["perplexity"]["mean_nll"] and a["layers"] == r["layers"]
    x, y = _tensors(tmp_path / "ref"), _tensors(out)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_resuming_on_another_number_of_ranks_is_one_line(tiny_model_dir, text_file, tmp_path):
    script = tmp_path / "dying.py"
    script.write_text(_DYING)
    out = tmp_path / "run"
    died = _launch(_args(tiny_model_dir, text_file, out, "wanda"), 2, script)
    assert died.returncode != 0
    alone = _compress(tiny_model_dir, text_file, out, "wanda", 1)
    assert alone.returncode != 0
    lines = [ln for ln in alone.stderr.splitlines() if ln.startswith("capllm: error")]
    assert len(lines) == 1 and "another number of processes" in lines[0] and "Traceback" not in alone.stderr


def _decompose_rank(rank: int, world: int, init: str, model_dir: str, out: str, scales_file: str, q) -> None:
    import torch.distributed as tdist

    from capllm.decompose import RPCAConfig, cache
    from capllm.engine.distributed import Dist
    from capllm.models.loader import load_model

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, _ = load_model(model_dir)
        scales = torch.load(scales_file)
        done = []
        real = cache._run
        cache._run = lambda handles, *a, **k: (done.extend(h.name for h in handles), real(handles, *a, **k))[1]
        cache.decompose_model(model, RPCAConfig(lam_scale=0.5, max_iter=8), out, col_scales=scales, progress=False, dist=Dist(rank, world, 0, "gloo"))
        q.put((rank, done))
    finally:
        tdist.destroy_process_group()


def test_stage1_robust_pca_is_divided_among_ranks_and_bit_identical(tiny_model_dir, tmp_path):
    """Each rank decomposes its share of the matrices into the one cache; the files are the
    single process's, bit for bit, and the manifest lists every matrix."""
    import torch.multiprocessing as mp

    from capllm.decompose import RPCAConfig, decompose_model
    from capllm.models.layers import find_linears
    from capllm.models.loader import load_model

    torch.set_num_threads(1)
    model, _ = load_model(str(tiny_model_dir))
    g = torch.Generator().manual_seed(0)
    scales = {h.name: torch.rand(h.shape[1], generator=g) + 0.5 for h in find_linears(model)}
    torch.save(scales, tmp_path / "scales.pt")
    decompose_model(model, RPCAConfig(lam_scale=0.5, max_iter=8), tmp_path / "one", col_scales=scales, progress=False)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_decompose_rank, args=(r, 2, f"file://{tmp_path / 'rdzv'}", str(tiny_model_dir), str(tmp_path / "two"), str(tmp_path / "scales.pt"), q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    shares = dict(q.get() for _ in range(2))
    names = [h.name for h in find_linears(model)]
    assert sorted(shares[0] + shares[1]) == sorted(names) and shares[0] and shares[1] and not set(shares[0]) & set(shares[1])
    man = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert list(man["matrices"]) == names
    for n in names:
        a = _tensors_of(tmp_path / "one" / man["matrices"][n]["file"])
        b = _tensors_of(tmp_path / "two" / man["matrices"][n]["file"])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), n


def _tensors_of(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


_LYING = '''
import os, sys
from capllm.cli.main import main
argv = sys.argv[1:]
if os.environ.get("RANK") == "1":
    argv[argv.index("--ratio") + 1] = "0.4"
sys.exit(main(argv))
'''


def test_ranks_with_different_arguments_are_one_line(tiny_model_dir, text_file, tmp_path):
    script = tmp_path / "lying.py"
    script.write_text(_LYING)
    proc = _launch(_args(tiny_model_dir, text_file, tmp_path / "o", "wanda"), 2, script)
    assert proc.returncode != 0
    mine = [ln for ln in proc.stderr.splitlines() if ln.startswith("capllm: error: the job")]
    assert len(mine) == 1 and "differs between ranks" in mine[0] and not (tmp_path / "o").exists()


def test_a_blocks_matrices_are_divided_by_cost_longest_first():
    """:meth:`Dist.owners` (longest processing time first) on SmolLM2's block by SVD cost: the
    busiest rank gets the optimum found by trying every assignment (round robin: 1.21× it), all
    ranks compute the same list; on random costs over 3 ranks it stays within Graham's 4/3 − 1/(3k)
    of the optimum (k = 3), and one process owns everything."""
    import itertools

    from capllm.engine.distributed import Dist, svd_cost

    def worst(costs, owners, world):
        return max(sum(c for c, o in zip(costs, owners) if o == r) for r in range(world))

    def best(costs, world):
        return min(worst(costs, a, world) for a in itertools.product(range(world), repeat=len(costs)))

    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # q k v o gate up down
    costs = [svd_cost(sh) for sh in shapes]
    owners = Dist(rank=0, world=2).owners(costs)
    assert owners == Dist(rank=1, world=2).owners(costs)
    assert worst(costs, owners, 2) == best(costs, 2)
    assert worst(costs, [j % 2 for j in range(7)], 2) > 1.2 * best(costs, 2)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        c = (torch.rand(7, generator=g) ** 3).tolist()
        assert worst(c, Dist(rank=0, world=3).owners(c), 3) <= (4 / 3 - 1 / 9) * best(c, 3) + 1e-12
    assert Dist().owners(costs) == [0] * 7
