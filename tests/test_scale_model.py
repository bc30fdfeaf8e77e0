"""benchmarks/scale.py: the random-weight checkpoints it builds and the pieces of its fit."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


def _scale():
    spec = importlib.util.spec_from_file_location("capllm_bench_scale", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_shapes_give_the_published_parameter_counts():
    s = _scale()
    assert s.shape_params(s.SHAPES["llama3-8b"], 32) == 8_030_261_248
    assert s.shape_params(s.SHAPES["llama3-70b"], 80) == 70_553_706_496
    assert sum(p.numel() for p in s.meta_model(s.SHAPES["llama3-8b"], 2).parameters()) == s.shape_params(s.SHAPES["llama3-8b"], 2)


def test_make_model_writes_a_loadable_bf16_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = _scale()
    out = tmp_path / "tiny"
    s.cmd_make_model(SimpleNamespace(shape="tiny", blocks=2, dtype="bfloat16", out=str(out), seed=0, init_device="cpu"))
    meta = json.loads((out / "scale_shape.json").read_text())
    assert meta["full_layers"] == 2 and meta["blocks"] == 2 and abs(meta["init_std_measured"] - 0.02) < 0.003
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64 and model.config.vocab_size == 512
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    assert int(ids.max()) < 512
    assert torch.isfinite(model(ids).logits.float()).all()
    arch = s.arch_of(out)
    assert arch["synthetic"] and arch["shape"] == "tiny" and arch["blocks"] == 2


def test_nnls_fit_recovers_a_known_model_and_stage_split():
    s = _scale()
    rows = [{"TPG": float(x), "O": float(y)} for x, y in [(1e9, 1e6), (4e9, 3e6), (2e9, 9e6), (8e9, 2e6)]]
    ys = [2e-9 * r["TPG"] + 5e-7 * r["O"] for r in rows]
    coef, pred = s.nnls_fit(rows, ys, ["TPG", "O"])
    assert math.isclose(coef["TPG"], 2e-9, rel_tol=1e-6) and math.isclose(coef["O"], 5e-7, rel_tol=1e-6)
    cell = {"method": "cap", "time_s": {"load_model": 1.0, "calibration_data": 0.5, "capture": 0.1, "stage1_rpca": 3.0, "stage1": 5.0, "fisher": 2.0,
                                        "stage2_scores": 1.0, "stage2_final": 1.0, "refit": 4.0, "compress": 13.0, "total": 15.5}}
    st = s.stage_seconds(cell)
    assert st["stage1_stats"] == 2.0 and st["stage1_rpca"] == 3.0
    assert math.isclose(st["other"], 1.5) and math.isclose(sum(st.values()), 15.5)
