"""A run killed anywhere resumes to the bit-identical result.

Each case forks a child that runs ``capllm compress`` and dies abruptly (``os._exit``: no
``finally``, no flush — what ``kill -9`` leaves) at one point of the pipeline: during the
statistics pass, inside Stage 1's robust PCA, in the block-wise backward, while scoring, while
writing the final mask, in the refit pass, in the final evaluation. The same command is then
run again; its ``result.json`` numbers and saved tensors must equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from capllm.cli.main import main

KILLS = {  # point → (object path, attribute, die before its n-th call)
    "statistics": ("capllm.allocate.stage1", "Stage1Pass.finish_block", 2),
    "stage1_rpca": ("capllm.decompose.cache", "save_decomposition", 4),
    "fisher": ("capllm.engine.backward", "DiskCheckpoint.__call__", 2),
    "scores": ("capllm.allocate.store", "CapStore.save_key", 5),
    "selection": ("capllm.allocate.store", "CapStore.save_keep", 4),
    "refit": ("capllm.engine.checkpoint", "PassCheckpoint.mark", 4),  # calls 1–2: the statistics pass
    "eval": ("capllm.eval.perplexity", "perplexity_of_ids", 2),
}


def _args(model_dir: Path, text: Path, out: Path, method: str = "cap") -> list[str]:
    return ["compress", "--model", str(model_dir), "--method", method, "--ratio", "0.5", "--calib", str(text), "--nsamples", "3", "--seqlen", "24",
            "--dataset", str(text), "--eval-seqlen", "24", "--max-windows", "3", "--out", str(out), "--quiet"] + (
            ["--option", "rpca_max_iter=8", "--option", "score=fisher"] if method == "cap" else [])


def _run_child(argv: list[str], kill: tuple[str, str, int] | None) -> int:
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            torch.set_num_threads(1)
            if kill is not None:
                import importlib

                mod_name, attr, nth = kill
                mod = importlib.import_module(mod_name)
                owner, name = (mod, attr) if "." not in attr else (getattr(mod, attr.split(".")[0]), attr.split(".")[1])
                orig = getattr(owner, name)
                calls = {"n": 0}

                def dying(*a, **kw):
                    calls["n"] += 1
                    if calls["n"] >= nth:
                        os._exit(137)
                    return orig(*a, **kw)

                setattr(owner, name, dying)
            code = main(argv)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _numbers(out: Path) -> dict:
    r = json.loads((out / "result.json").read_text())
    return {k: r.get(k) for k in ("perplexity", "perplexity_dense", "params", "layers", "method_results")} | {
        "perplexity": {k: v for k, v in r["perplexity"].items() if k != "time_s"},
        "perplexity_dense": {k: v for k, v in r["perplexity_dense"].items() if k not in ("time_s", "cached")},
    }


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            got.update({f"{f.name}:{k}": sf.get_tensor(k) for k in sf.keys()})
    return got


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import TEXT, tiny_model, train_tokenizer

    root = tmp_path_factory.mktemp("resume")
    tok = train_tokenizer(vocab=300)
    model = tiny_model("llama", vocab=len(tok))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "text.txt").write_text(TEXT)
    ref = root / "ref"
    old = os.environ.get("CAPLLM_CACHE")
    os.environ["CAPLLM_CACHE"] = str(root / "cache-ref")
    try:
        assert _run_child(_args(root / "model", root / "text.txt", ref), None) == 0
    finally:
        if old is None:
            os.environ.pop("CAPLLM_CACHE", None)
        else:
            os.environ["CAPLLM_CACHE"] = old
    return root, ref


@pytest.mark.parametrize("point", list(KILLS))
def test_kill_anywhere_then_resume_is_bit_identical(point, setup, monkeypatch):
    root, ref = setup
    monkeypatch.setenv("CAPLLM_CACHE", str(root / f"cache-{point}"))  # Stage 1 starts from nothing too
    monkeypatch.setenv("CAPLLM_TIMER_HEARTBEAT_S", "0.05")
    out = root / f"run-{point}"
    argv = _args(root / "model", root / "text.txt", out)
    assert _run_child(argv, KILLS[point]) == 137
    assert not out.exists() and (out.parent / f"{out.name}.work").is_dir()
    beat = json.loads((out.parent / f"{out.name}.work" / "timer.json").read_text())  # the killed attempt's time, running stages included
    assert beat["total"] > 0 and "load_model" in beat
    assert _run_child(argv, None) == 0
    times = json.loads((out / "result.json").read_text())["time_s"]
    assert times["total"] > beat["total"] and all(times[k] >= v - 1e-6 for k, v in beat.items())  # the resumed run adds the killed one's time
    assert not (out.parent / f"{out.name}.work").exists()  # removed once the result is in place
    assert _numbers(out) == _numbers(ref)
    a, b = _tensors(out), _tensors(ref)
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((out / "result.json").read_text())["attempts"] == 2


def test_resume_with_another_configuration_is_one_line(setup, tmp_path, monkeypatch, capsys):
    root, _ = setup
    monkeypatch.setenv("CAPLLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    argv = _args(root / "model", root / "text.txt", out)
    assert _run_child(argv, KILLS["scores"]) == 137
    other = [a if a != "0.5" else "0.4" for a in argv]
    assert main(other) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different configuration" in err[0] and "ratio" in err[0]


def test_layerwise_method_resumes_too(setup, tmp_path, monkeypatch):
    root, _ = setup
    monkeypatch.setenv("CAPLLM_CACHE", str(tmp_path / "cache"))
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert _run_child(_args(root / "model", root / "text.txt", ref, "sparsegpt"), None) == 0
    argv = _args(root / "model", root / "text.txt", out, "sparsegpt")
    assert _run_child(argv, ("capllm.engine.checkpoint", "PassCheckpoint.mark", 2)) == 137
    assert _run_child(argv, None) == 0
    assert _numbers(out) == _numbers(ref)
    a, b = _tensors(out), _tensors(ref)
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_block_tuning_resumes_with_its_dense_stream(setup, tmp_path, monkeypatch):
    """Tuning towards dense targets keeps a second activation stream; a run killed after a
    block resumes from both streams to the bit-identical result."""
    root, _ = setup
    monkeypatch.setenv("CAPLLM_CACHE", str(tmp_path / "cache"))
    tune = ["--option", "tune_epochs=2", "--option", "tune_hold_out=3", "--option", "tune_batch=1"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert _run_child(_args(root / "model", root / "text.txt", ref, "sparsegpt") + tune, None) == 0
    argv = _args(root / "model", root / "text.txt", out, "sparsegpt") + tune
    assert _run_child(argv, ("capllm.engine.checkpoint", "PassCheckpoint.mark", 2)) == 137
    assert list((out.parent / f"{out.name}.work").rglob("dense_0000.safetensors"))  # the dense stream was saved with block 0
    assert _run_child(argv, None) == 0
    assert _numbers(out) == _numbers(ref)
    assert "block_tune" in json.dumps(_numbers(out)["layers"])
    a, b = _tensors(out), _tensors(ref)
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_resume_dir_alone_continues_the_run(setup, tmp_path, monkeypatch):
    """``capllm compress --resume OUT`` needs nothing else: it continues with the interrupted
    run's own arguments and gives the same result."""
    root, ref = setup
    monkeypatch.setenv("CAPLLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert _run_child(_args(root / "model", root / "text.txt", out), KILLS["refit"]) == 137
    assert _run_child(["compress", "--resume", str(out), "--quiet"], None) == 0
    assert _numbers(out) == _numbers(ref)
    assert main(["compress", "--resume", str(tmp_path / "nothing")]) != 0


def test_timer_snapshot_counts_the_running_stage_and_the_heartbeat_stops_cleanly(tmp_path):
    import time

    from capllm.utils import StageTimer, TimerHeartbeat, resumed_times

    timer = StageTimer(previous={"load_model": 1.0, "total": 5.0})
    path = tmp_path / "work" / "timer.json"
    path.parent.mkdir()
    with TimerHeartbeat(timer, path, interval=0.01):
        with timer.stage("compress"):
            t0 = time.perf_counter()
            snap = {}
            while "compress" not in snap and time.perf_counter() - t0 < 10:  # the thread's next beat (a loaded machine may delay it)
                time.sleep(0.02)
                snap = json.loads(path.read_text())
            assert 0.0 < snap["compress"] <= time.perf_counter() - t0 + 1e-3 and snap["load_model"] == 1.0 and snap["total"] > 5.0
            assert "compress" not in timer.as_dict()  # as_dict: finished stages only
    assert not path.exists()  # stopped and removed with the run
    assert resumed_times({"total": 1.0}, path) == {"total": 1.0}
    path.write_text(json.dumps({"a": 2.0, "total": 9.0}))
    assert resumed_times({"total": 1.0}, path) == {"a": 2.0, "total": 9.0} and resumed_times({"total": 10.0}, path) == {"total": 10.0}
