"""The command line: bad input gives one clear line and a non-zero exit; a tiny job end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from capllm.cli.main import main


def _run(args, capsys):
    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["compress", "--method", "nope"], "unknown method 'nope'"),
        (["compress", "--ratio", "1.5"], "ratio 1.5 is outside (0, 1)"),
        (["compress", "--ratio", "0"], "outside (0, 1)"),
        (["compress", "--model", "./does/not/exist", "--no-eval"], "does not exist"),
        (["eval", "--model", "./does/not/exist"], "does not exist"),
        (["compress", "--method", "wanda", "--structure", "2:4", "--ratio", "0.3"], "pass --ratio 0.5"),
        (["compress", "--method", "svd", "--structure", "2:4"], "does not support N:M"),
        (["compress", "--method", "wanda", "--structure", "banana"], "not N:M"),
        (["compress", "--method", "sparsegpt", "--option", "nosuch=1"], "has no option 'nosuch'"),
        (["download", "nope"], "unknown asset"),
    ],
)
def test_bad_input_is_one_line(args, needle, capsys):
    rc, out, err = _run(args, capsys)
    assert rc != 0
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("capllm: error:") and needle in lines[0]


def test_existing_out_dir_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc, _, err = _run(["compress", "--model", "./does/not/exist", "--out", str(out)], capsys)
    assert rc == 2 and "already exists" in err
    assert (out / "keep.txt").read_text() == "precious"


def test_methods_lists_each_method_once(capsys):
    rc, out, _ = _run(["methods"], capsys)
    names = [l.split()[0] for l in out.strip().splitlines()]
    assert rc == 0 and {"dense", "magnitude", "wanda", "sparsegpt"} <= set(names)
    assert len(names) == len(set(names))


def test_compress_end_to_end_on_a_tiny_model(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, err = _run([
        "compress", "--model", str(tiny_model_dir), "--method", "sparsegpt", "--ratio", "0.5",
        "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32", "--dataset", str(text_file),
        "--eval-seqlen", "64", "--max-windows", "4", "--device", "cpu", "--out", str(out), "--quiet",
    ], capsys)
    assert rc == 0, err
    assert "Loading weights" not in err and "it/s]" not in err  # --quiet: no bars, transformers' own included
    res = json.loads((out / "result.json").read_text())
    for key in ("capllm_version", "method", "ratio", "structure", "model", "params", "calibration", "perplexity", "time_s", "peak_rss_mb", "device", "layers"):
        assert key in res
    p = res["params"]
    assert p["kept_linear"] == p["dense_linear"] // 2
    assert p["whole_model_kept"] == p["whole_model_dense"] - p["dense_linear"] // 2
    assert res["calibration"] == {**res["calibration"], "nsamples": 4, "seqlen": 32, "seed": 0}
    ppl = res["perplexity"]
    assert ppl["windows"] == 4 and ppl["seqlen"] == 64 and ppl["tokens"] == 4 * 63
    assert res["perplexity_dense"]["value"] > 0
    assert len(res["layers"]) == 14 and all(l["kept_params"] == l["dense_params"] // 2 for l in res["layers"])
    assert "total" in res["time_s"] and "compress" in res["time_s"]
    assert "perplexity (compressed)" in stdout
    assert not list(tmp_path.glob(".run.tmp-*"))  # the temporary directory was renamed away


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "capllm", "compress", "--ratio", "2"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "outside (0, 1)" in proc.stderr
