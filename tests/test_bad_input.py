"""Broken input files — a corrupt model directory, a calibration or evaluation text that is not
UTF-8 — are one ``capllm: error:`` line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest

from capllm.cli.main import main
from capllm.errors import CapllmError


def _one_error_line(args, capsys) -> str:
    rc = main(args)
    err = capsys.readouterr().err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert rc != 0
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("capllm: error:"), err
    return lines[0]


def _config(d):
    return d / "config.json"


CORRUPT_MODEL_DIRS = {
    "not JSON": (lambda d: _config(d).write_text("{model_type: llama"), "config.json is not valid JSON"),
    "truncated": (lambda d: _config(d).write_text(_config(d).read_text()[:40]), "truncated?"),
    "empty": (lambda d: _config(d).write_text(""), "it is empty"),
    "binary": (lambda d: _config(d).write_bytes(b"\xff\xfe\x00\x01garbage"), "is not JSON text (byte 0 is not UTF-8)"),
    "an array": (lambda d: _config(d).write_text("[1, 2]"), "holds an array, not a JSON object"),
    "no model_type": (lambda d: _config(d).write_text('{"hidden_size": 64}'), 'has no "model_type"'),
    "unknown model_type": (lambda d: _config(d).write_text('{"model_type": "nosuchmodel"}'), "model_type 'nosuchmodel' is unknown to transformers"),
    "not a causal LM": (lambda d: _config(d).write_text('{"model_type": "t5"}'), "is not a causal language model"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "has config.json but no weights"),
    "truncated weights": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]), "model.safetensors is not a readable safetensors file"),
    "weights cut in the header": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:20]), "truncated or corrupt"),
    "no tokenizer": (lambda d: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")], "has no tokenizer files"),
    "corrupt tokenizer.json": (lambda d: (d / "tokenizer.json").write_text('{"version": "1.0", "model": {'), "tokenizer.json is not valid JSON"),
}


@pytest.mark.parametrize("case", list(CORRUPT_MODEL_DIRS))
def test_a_corrupt_model_directory_is_one_line(case, tiny_model_dir, text_file, capsys):
    corrupt, needle = CORRUPT_MODEL_DIRS[case]
    corrupt(tiny_model_dir)
    line = _one_error_line(["eval", "--model", str(tiny_model_dir), "--dataset", str(text_file), "--device", "cpu", "--quiet"], capsys)
    assert needle in line and str(tiny_model_dir) in line


def test_compress_refuses_a_corrupt_config_in_one_line(tiny_model_dir, tmp_path, capsys):
    _config(tiny_model_dir).write_text('{"model_type": "llama", "hidden_size": 6')
    line = _one_error_line(["compress", "--model", str(tiny_model_dir), "--method", "wanda", "--no-eval", "--save", "none", "--device", "cpu", "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert "config.json is not valid JSON" in line
    assert not (tmp_path / "o").exists()


def test_a_sharded_checkpoint_missing_a_shard(tiny_model_dir):
    from capllm.models.loader import check_model_dir

    check_model_dir(tiny_model_dir)  # the intact directory passes
    (tiny_model_dir / "model.safetensors").rename(tiny_model_dir / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tiny_model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CapllmError, match="lists model-00002-of-00002.safetensors, which is missing"):
        check_model_dir(tiny_model_dir)


def _not_utf8_txt(p):
    p.write_bytes(b"The quick brown fox " * 20 + b"\xff\xfe" + b" tail")
    return p, 400


def _not_utf8_jsonl(p):
    first = b'{"text": "fine"}\n'
    p.write_bytes(first + b'{"text": "caf\xe9"}\n')
    return p, len(first) + len(b'{"text": "caf')


@pytest.mark.parametrize("flag", ["--calib", "--dataset"])
@pytest.mark.parametrize("make, name", [(_not_utf8_txt, "binary.txt"), (_not_utf8_jsonl, "latin1.jsonl")])
def test_a_text_file_that_is_not_utf8_is_one_line(flag, make, name, tiny_model_dir, tmp_path, capsys):
    f, offset = make(tmp_path / name)
    args = ["compress", "--model", str(tiny_model_dir), "--method", "wanda", "--nsamples", "1", "--seqlen", "16", "--device", "cpu", "--save", "none", "--out", str(tmp_path / "o"), "--quiet"]
    args += [flag, str(f)] + (["--no-eval"] if flag == "--calib" else ["--calib", str(tmp_path / "ok.txt")])
    (tmp_path / "ok.txt").write_text("plain calibration text, long enough for one window. " * 20)
    line = _one_error_line(args, capsys)
    assert str(f) in line and f"offset {offset}" in line and "must be UTF-8" in line


def test_eval_on_a_gzipped_jsonl_that_is_not_utf8(tiny_model_dir, tmp_path, capsys):
    f = tmp_path / "docs.jsonl.gz"
    with gzip.open(f, "wb") as fh:
        fh.write(b'{"text": "caf\xe9"}\n')
    line = _one_error_line(["eval", "--model", str(tiny_model_dir), "--dataset", str(f), "--device", "cpu", "--quiet"], capsys)
    assert "offset 13 of the decompressed text" in line


def test_eval_on_a_truncated_gzip(tiny_model_dir, tmp_path, capsys):
    f = tmp_path / "docs.jsonl.gz"
    f.write_bytes(gzip.compress(b'{"text": "some text"}\n' * 50)[:30])
    line = _one_error_line(["eval", "--model", str(tiny_model_dir), "--dataset", str(f), "--device", "cpu", "--quiet"], capsys)
    assert "not a complete gzip file" in line


def test_the_console_script_prints_no_traceback_for_a_corrupt_config(tiny_model_dir, text_file):
    _config(tiny_model_dir).write_text("not json at all")
    proc = subprocess.run([sys.executable, "-m", "capllm", "eval", "--model", str(tiny_model_dir), "--dataset", str(text_file), "--device", "cpu", "--quiet"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("capllm: error:") and "config.json is not valid JSON" in proc.stderr
