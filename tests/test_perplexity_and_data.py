"""The perplexity protocol against a hand computation, and the data sources."""

from __future__ import annotations

import json
import math

import pytest
import torch

from capllm.data.calibration import CalibrationConfig, load_calibration, sample_windows, tokenize_text
from capllm.data.sources import load_text
from capllm.errors import CapllmError
from capllm.eval.perplexity import PerplexityConfig, evaluate_perplexity, perplexity_of_ids
from conftest import SHARED_DATA, TEXT, tiny_model, train_tokenizer


def test_perplexity_equals_hand_computation():
    model = tiny_model("llama", seed=2)
    ids = torch.randint(0, 128, (3 * 20 + 7,), generator=torch.Generator().manual_seed(0))
    res = perplexity_of_ids(model, ids, seqlen=20, progress=False)
    # by hand: each window independently, log-softmax, pick the next token, average over all
    total, count = 0.0, 0
    for w in range(3):
        x = ids[w * 20 : (w + 1) * 20]
        with torch.no_grad():
            logp = torch.log_softmax(model(x.unsqueeze(0)).logits[0].double(), -1)
        for t in range(19):
            total -= logp[t, x[t + 1]].item()
            count += 1
    assert res["windows"] == 3 and res["tokens"] == count == 57
    assert res["tail_tokens_unscored"] == 7
    assert res["value"] == pytest.approx(math.exp(total / count), rel=1e-6)


def test_perplexity_batching_and_max_windows():
    model = tiny_model("gpt2", seed=1)
    ids = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(1))
    a = perplexity_of_ids(model, ids, seqlen=10, batch_size=1, progress=False)
    b = perplexity_of_ids(model, ids, seqlen=10, batch_size=4, progress=False)
    assert a["value"] == pytest.approx(b["value"], rel=1e-5)
    c = perplexity_of_ids(model, ids, seqlen=10, max_windows=3, progress=False)
    assert c["windows"] == 3 and c["windows_available"] == 10 and c["tokens"] == 27


def test_nonfinite_loss_names_the_window():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (40,))
    with torch.no_grad():
        model.lm_head.weight[5] = float("nan")
    with pytest.raises(CapllmError, match="window 0"):
        perplexity_of_ids(model, ids, seqlen=10, progress=False)


def test_evaluate_perplexity_on_a_text_file(text_file):
    tok = train_tokenizer(300)
    model = tiny_model("llama", vocab=len(tok))
    res = evaluate_perplexity(model, tok, PerplexityConfig(dataset=str(text_file), seqlen=64), progress=False)
    assert res["dataset"] == "corpus.txt" and res["seqlen"] == 64 and res["windows"] >= 10
    assert math.isfinite(res["value"]) and res["bos"].startswith("none")


def test_calibration_windows_are_seeded_like_the_reference():
    import random

    ids = torch.arange(1000)
    w = sample_windows(ids, 5, 50, seed=0)
    random.seed(0)
    starts = [random.randint(0, 1000 - 50 - 1) for _ in range(5)]
    assert torch.equal(w, torch.stack([ids[s : s + 50] for s in starts]))
    assert not torch.equal(w, sample_windows(ids, 5, 50, seed=1))


def test_local_data_dir_layout(tmp_path):
    wt = tmp_path / "wikitext-2-raw"
    wt.mkdir()
    (wt / "wiki.test.raw").write_text(" = Title = \n\n Some text here . \n More text . \n")
    en = tmp_path / "enwiki-excerpt"
    en.mkdir()
    (en / "articles.jsonl").write_text(json.dumps({"title": "A", "text": "alpha"}) + "\n" + json.dumps({"title": "B", "text": "beta"}) + "\n")
    src = load_text("wikitext2", "test", tmp_path)
    # rows as `datasets` gives them, joined with "\n\n"
    assert src.text == "\n\n".join([" = Title = \n", "", " Some text here . \n", " More text . \n"])
    assert load_text("enwiki", "train", tmp_path).text == "alpha\n\nbeta"
    assert load_text("auto", "test", tmp_path, purpose="eval").name == "wikitext2"
    assert load_text("auto", "train", tmp_path, purpose="calib").name == "enwiki"


@pytest.mark.skipif(not (SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").exists(), reason="shared data not beside the checkout")
def test_shared_wikitext_rows():
    src = load_text("wikitext2", "test", SHARED_DATA)
    rows = src.text.split("\n\n")  # the raw test file: rows joined with a blank line
    assert len(rows) == src.documents
    assert src.documents == 4358


def test_unknown_dataset_and_missing_sources(tmp_path):
    with pytest.raises(CapllmError, match="unknown dataset"):
        load_text("nope", "test")
    with pytest.raises(CapllmError, match="does not exist"):
        load_text("nothere.txt", "test")
    with pytest.raises(CapllmError, match="not available locally"):
        load_text("wikitext2", "test", tmp_path)  # empty data dir, hub offline in tests


def test_calibration_from_jsonl(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"text": TEXT[i * 500 : (i + 1) * 500]}) + "\n" for i in range(10)))
    tok = train_tokenizer(300)
    cal = load_calibration(tok, CalibrationConfig(dataset=str(p), nsamples=4, seqlen=32, seed=3))
    assert cal.windows.shape == (4, 32)
    d = cal.describe()
    assert d["dataset"] == "c.jsonl" and d["nsamples"] == 4 and d["seed"] == 3
    ids = tokenize_text(tok, "\n\n".join(TEXT[i * 500 : (i + 1) * 500] for i in range(10)))
    assert torch.equal(cal.windows, sample_windows(ids, 4, 32, 3))
