"""The benchmark grid: cells run as separate processes, resume after a killed/corrupted cell without
recomputing finished ones, and the report is written from whatever is finished."""

from __future__ import annotations

import json
import os

import pytest

from capllm.cli.main import main
from capllm.errors import CapllmError
from capllm.grid.run import BenchConfig, Cell, plan


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.one_thread)


def _grid_args(tiny_model_dir, text_file, out):
    return ["bench", "--models", str(tiny_model_dir), "--methods", "dense,magnitude", "--ratios", "0.5", "--out", str(out),
            "--dataset", str(text_file), "--eval-seqlen", "64", "--max-windows", "1", "--calib", str(text_file), "--nsamples", "2",
            "--seqlen", "32", "--", "--device", "cpu"]


def test_grid_resumes_after_a_killed_cell(tiny_model_dir, text_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny cells: one thread is faster than two on a shared machine
    out = tmp_path / "grid"
    assert main(_grid_args(tiny_model_dir, text_file, out)) == 0, capsys.readouterr().err
    cells = out / "cells"
    dense, mag = cells / "tiny-llama__dense", cells / "tiny-llama__magnitude-0.5"
    r_dense, r_mag = json.loads((dense / "result.json").read_text()), json.loads((mag / "result.json").read_text())
    assert r_dense["method"] == "dense" and r_mag["method"] == "magnitude" and r_mag["ratio"] == 0.5
    report = (out / "report.md").read_text()
    assert "| magnitude | 50% |" in report and "| dense | – |" in report and (out / "ppl_vs_ratio__tiny-llama.png").stat().st_size > 0
    stamp = os.stat(dense / "result.json").st_mtime_ns
    capsys.readouterr()

    # a cell killed mid-write: its result is unreadable and its temporary directory was left behind
    (mag / "result.json").write_text('{"method": "magn')
    (cells / ".tiny-llama__magnitude-0.5.tmp-killed").mkdir()
    assert main(_grid_args(tiny_model_dir, text_file, out)) == 0
    err = capsys.readouterr().err
    assert "[skip] tiny-llama__dense" in err and "[run]  tiny-llama__magnitude-0.5" in err and "[run]  tiny-llama__dense" not in err
    assert os.stat(dense / "result.json").st_mtime_ns == stamp  # the finished cell was not recomputed
    again = json.loads((mag / "result.json").read_text())
    assert again["perplexity"]["value"] == pytest.approx(r_mag["perplexity"]["value"], rel=1e-6)  # recomputed, same answer
    assert not list(cells.glob(".*tmp-*"))
    assert (out / "logs" / "tiny-llama__magnitude-0.5.log").exists()

    # everything finished: a third run recomputes nothing
    assert main(_grid_args(tiny_model_dir, text_file, out)) == 0
    assert "[run]" not in capsys.readouterr().err


def test_plan_and_failures(tiny_model_dir, text_file, tmp_path, capsys):
    cells = plan(BenchConfig(("m",), ("dense", "wanda", "magnitude"), (0.3, 0.5), str(tmp_path)))
    assert [c.name for c in cells] == ["m__dense", "m__wanda-0.3", "m__wanda-0.5", "m__magnitude-0.3", "m__magnitude-0.5"]
    assert Cell("org/name", "wanda", 0.4).name == "name__wanda-0.4"
    with pytest.raises(CapllmError, match="unknown method"):
        plan(BenchConfig(("m",), ("nope",), (0.5,), str(tmp_path)))
    with pytest.raises(CapllmError, match="outside"):
        plan(BenchConfig(("m",), ("wanda",), (1.5,), str(tmp_path)))
    # a failing cell is reported (exit 1, its log kept) and does not stop the grid
    out = tmp_path / "g"
    rc = main(["bench", "--models", str(tmp_path / "nosuchmodel"), "--methods", "magnitude", "--ratios", "0.5", "--out", str(out), "--", "--no-eval"])
    err = capsys.readouterr().err
    assert rc == 1 and "[fail]" in err and "does not exist" in (out / "logs" / "nosuchmodel__magnitude-0.5.log").read_text()
    assert (out / "report.md").exists() and "Not finished" in (out / "report.md").read_text()


def test_report_peers_and_allocation_plot(tmp_path):
    """Report rows, capllm/peer ratios and the CAP allocation plot from hand-written cell results."""
    from capllm.grid.report import write_report

    def cell(method, ratio, ppl, alloc=None):
        r = {"method": method, "ratio": ratio, "structure": None, "model": {"name": "m"}, "perplexity": {"value": ppl, "dataset": "d", "split": "test", "windows": 1, "seqlen": 8, "tokens": 7},
             "params": {"dense_linear": 100, "kept_linear": int(100 * (1 - ratio)), "whole_model_dense": 150, "whole_model_kept": 150 - int(100 * ratio)},
             "time_s": {"compress": 1.0, "total": 2.0}, "peak_rss_mb": 10.0}
        if alloc:
            r["method_results"] = {"allocation": alloc}
        d = tmp_path / "cells" / f"m__{method}-{ratio:g}"
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps(r))

    alloc = [{"name": f"model.layers.{i}.self_attn.{k}", "shape": [4, 4], "rank_kept": 1, "nnz_kept": 2, "kept_params": 10, "kept_fraction": 10 / 16}
             for i in range(3) for k in ("q_proj", "o_proj")]
    cell("wanda", 0.5, 66.0)
    cell("cap", 0.5, 50.0, alloc)
    peers = [{"tool": "llm-compressor 0.14", "method": "wanda", "ratio": 0.5, "model": "m", "perplexity": {"value": 60.0}}]
    text = write_report(tmp_path, None, peers).read_text()
    assert "| wanda | 50% | 66.00 | llm-compressor 0.14 | 60.00 | 1.100 |" in text
    assert (tmp_path / "allocation__m__cap-0.5.png").exists() and not (tmp_path / "allocation__m__wanda-0.5.png").exists()


def test_cells_on_several_processes_launch_through_torchrun(tmp_path):
    from pathlib import Path

    from capllm.grid.run import cell_command

    cfg = BenchConfig(models=("m",), methods=("sparsegpt",), ratios=(0.5,), out=str(tmp_path), nproc=2, python="py")
    cmd = cell_command(cfg, Cell("m", "sparsegpt", 0.5), Path("cells/x"))
    assert cmd[:6] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] and cmd[6:9] == ["-m", "capllm", "compress"]
    one = cell_command(BenchConfig(models=("m",), methods=("sparsegpt",), ratios=(0.5,), out=str(tmp_path), python="py"), Cell("m", "sparsegpt", 0.5), Path("c"))
    assert one[:4] == ["py", "-m", "capllm", "compress"]


def test_quality_table_names_what_guard_auto_meant_when_each_cell_ran():
    """benchmarks/quality.py labels a cell by the options that differ from today's defaults: a cell
    whose ``guard=auto`` checked only ``uniform`` (auto before the mix alternatives) is labelled so,
    and one that spelled out today's auto reads ``defaults``."""
    import importlib.util
    from pathlib import Path

    from capllm.methods.cap import GUARD_AUTO

    spec = importlib.util.spec_from_file_location("quality", Path(__file__).parents[1] / "benchmarks" / "quality.py")
    q = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(q)
    cell = lambda guard, against: {"method": "cap", "method_options": {"guard": guard, "tune_epochs": 10},
                                   "method_results": {"guard": {"against": against, "losses": {}, "chosen": "global"}}}
    assert q.changed(cell("auto", ["uniform"])) == "guard=uniform (auto then)"
    assert q.changed(cell("auto", GUARD_AUTO.split("+"))) == "defaults"
    assert q.changed(cell(GUARD_AUTO, GUARD_AUTO.split("+"))) == "defaults"
    assert q.changed(cell("block+uniform", ["block", "uniform"])) == "guard=block+uniform"
    assert q.changed({"method": "cap", "method_options": {}}) == "guard=none, tune_epochs=0"  # from before both options


def test_guard_curve_reads_the_mix_line_from_the_guard_records(tmp_path):
    """benchmarks/guard_curve.py puts uniform at α = 0, global at 1 and mixα at α, skips other
    alternatives (block) and cells without mixes, and keeps the fuller of two records of a model."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("guard_curve", Path(__file__).parents[1] / "benchmarks" / "guard_curve.py")
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    cell = lambda losses, chosen: {"model": {"name": "m"}, "ratio": 0.5, "method_results": {"guard": {"losses": losses, "chosen": chosen, "windows": 4, "seqlen": 8}}}
    cs = gc.curves([cell({"global": 3.0, "uniform": 4.0}, "global"),
                    cell({"global": 3.0, "uniform": 4.0, "block": 1.0, "mix0.5": 2.0}, "block"),
                    cell({"global": 3.0, "uniform": 4.0, "mix0.25": 2.5, "mix0.5": 2.0, "mix0.75": 2.2}, "mix0.5")])
    assert cs == {"m 50 %": {"points": [(0.0, 4.0), (0.25, 2.5), (0.5, 2.0), (0.75, 2.2), (1.0, 3.0)], "chosen": "mix0.5", "windows": 4, "seqlen": 8}}
    assert gc.alpha_of("mixx") is None and gc.alpha_of("block") is None


def test_zeroshot_compare_margin_and_its_standard_error(tmp_path):
    """benchmarks/zeroshot_compare.py: the eight-task mean, the margin over the reference row and
    the error of that margin equal a direct computation on planted accuracies; rows evaluated on
    different documents (another --limit) are refused instead of compared."""
    import importlib.util
    import json
    import math
    from pathlib import Path

    import pytest

    spec = importlib.util.spec_from_file_location("zeroshot_compare", Path(__file__).parents[1] / "benchmarks" / "zeroshot_compare.py")
    zc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zc)
    tasks = zc.PAPER

    def result(acc: float, n: int = 400) -> dict:
        per = {t: {"acc": acc + 0.01 * i, "primary_metric": "acc", "n": n, "seed": 0, "limit": n} for i, t in enumerate(tasks)}
        per["lambada_openai"] = {"acc": 0.9, "primary_metric": "acc", "n": n, "seed": 0, "limit": n}  # not one of the eight
        return {"zeroshot": {"tasks": per}, "perplexity": {"value": 10.0}}

    a, b = result(0.5), result(0.4)
    md = zc.table([("a", a), ("b", b)], ref="b")
    pa = [0.5 + 0.01 * i for i in range(8)]
    pb = [0.4 + 0.01 * i for i in range(8)]
    se = lambda ps: math.sqrt(sum(p * (1 - p) / 400 for p in ps)) / 8
    row_a = next(line for line in md.splitlines() if line.startswith("| a |"))
    assert f"{100 * sum(pa) / 8:.2f} ± {100 * se(pa):.2f}" in row_a
    assert row_a.endswith(f"| +10.00 ± {100 * math.hypot(se(pa), se(pb)):.2f} |")
    assert f"{100 * sum(p for p, t in zip(pa, tasks) if t != 'boolq') / 7:.2f}" in row_a
    with pytest.raises(SystemExit, match="other documents"):
        zc.table([("a", a), ("c", result(0.5, n=300))], ref="a")
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"zeroshot": {}}))
    with pytest.raises(SystemExit, match="no zero-shot results"):
        zc.load(f"x={f}")
