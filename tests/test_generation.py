"""The long-form generation check on a tiny model: greedy continuations have the asked length, the
dense model agrees with itself, and the perplexity under the dense model matches a direct computation."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from capllm.eval.generation import GenerationConfig, agreement, dense_reference, distinct_ngrams, generation_check, make_prompts
from conftest import TEXT, tiny_model, train_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.one_thread)


@pytest.fixture(scope="module")
def setup():
    tok = train_tokenizer(vocab=300)
    model = tiny_model("llama", seed=1, vocab=len(tok))
    cfg = GenerationConfig(prompts=3, prompt_tokens=10, new_tokens=12, batch_size=2)
    return model, tok, cfg, make_prompts(tok, TEXT, cfg)


def test_prompts_are_evenly_spaced_windows(setup):
    model, tok, cfg, prompts = setup
    ids = tok(TEXT).input_ids
    assert prompts.shape == (3, 10)
    assert prompts[0].tolist() == ids[:10]
    span = len(ids) - 10
    assert prompts[2].tolist() == ids[round(2 * span / 3) : round(2 * span / 3) + 10]


def test_dense_agrees_with_itself_and_score_is_direct(setup):
    model, tok, cfg, prompts = setup
    ref = dense_reference(model, prompts, cfg, "cpu", use_cache=False)
    assert ref["continuations"].shape == (3, 12)
    res = generation_check(model, tok, prompts, ref, model, cfg, "cpu")
    assert res["agreement"] == 1.0 and res["prefix_match"] == 12.0
    assert res["ppl_under_dense"] == pytest.approx(res["ppl_under_dense_reference"], rel=1e-9)
    # direct: step-by-step greedy decoding and the NLL of the chosen tokens under the same model
    with torch.no_grad():
        x = prompts.clone()
        nll = 0.0
        for _ in range(12):
            logp = torch.log_softmax(model(x).logits[:, -1].double(), -1)
            nxt = logp.argmax(-1)
            nll -= float(logp.gather(1, nxt[:, None]).sum())
            x = torch.cat([x, nxt[:, None]], 1)
    assert torch.equal(x[:, 10:], ref["continuations"])
    assert res["ppl_under_dense_reference"] == pytest.approx(math.exp(nll / 36), rel=1e-5)


def test_perturbed_model_disagrees_and_cache(setup, tmp_path):
    model, tok, cfg, prompts = setup
    model._capllm_source = {"name": "tiny", "revision_or_path": "test"}
    ref = dense_reference(model, prompts, cfg, "cpu")
    assert ref["cached"] is False and dense_reference(model, prompts, cfg, "cpu")["cached"] is True
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.model.layers.parameters():
            p.mul_(-1.0)
    res = generation_check(other, tok, prompts, ref, lambda: model, cfg, "cpu")
    assert res["agreement"] < 1.0 and res["ppl_under_dense"] > res["ppl_under_dense_reference"]
    assert len(res["examples"]) == 2 and res["tokens"] == 36


def test_metrics_helpers():
    a = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    b = torch.tensor([[1, 2, 9, 4], [1, 2, 3, 4]])
    assert agreement(a, b) == (7 / 8, (2 + 4) / 2)
    assert distinct_ngrams(torch.tensor([[5, 5, 5, 5, 5, 5]]), 4) == 1 / 3


def test_compress_job_runs_zeroshot_and_generation_in_memory(tiny_model_dir, text_file, tmp_path, capsys):
    """`capllm compress --tasks ... --gen-prompts ...` evaluates the compressed model before it exits."""
    import json

    from capllm.cli.main import main
    from test_zeroshot import DOCS, write_task

    out = tmp_path / "run"
    rc = main(["compress", "--model", str(tiny_model_dir), "--method", "magnitude", "--ratio", "0.5", "--dataset", str(text_file),
               "--eval-seqlen", "64", "--max-windows", "1", "--device", "cpu", "--out", str(out), "--quiet",
               "--tasks", "tiny_mc", "--include-path", str(write_task(tmp_path)), "--zs-source", "local", "--limit", "5",
               "--gen-prompts", "2", "--gen-tokens", "5", "--gen-prompt-tokens", "8"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "result.json").read_text())
    z = res["zeroshot"]["tasks"]["tiny_mc"]
    assert (z["n"], z["n_available"], z["limit"]) == (5, len(DOCS), 5) and 0 <= z["acc"] <= 1
    g = res["generation"]
    assert g["tokens"] == 10 and 0 <= g["agreement"] <= 1 and g["ppl_under_dense"] > 0
    assert {"zeroshot", "generation", "generation_dense"} <= set(res["time_s"]) and res["peak_rss_mb_compress"] > 0
    # a typo in --tasks fails before any compression
    rc = main(["compress", "--model", str(tiny_model_dir), "--method", "magnitude", "--no-eval", "--out", str(tmp_path / "x"), "--tasks", "piqa,nosuch", "--zs-source", "local"])
    assert rc == 2 and "nosuch" in capsys.readouterr().err and not (tmp_path / "x").exists()
