"""Bounded-memory execution: block-by-block evaluation, stored-dtype models, per-block arguments."""

from __future__ import annotations

import pytest
import torch

from capllm.eval.perplexity import choose_mode, perplexity_of_ids


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gemma3"])
def test_blockwise_perplexity_equals_the_whole_model(arch, one_thread):
    from test_backward import make_model

    model = make_model(arch, seed=1)
    ids = torch.randint(0, model.config.vocab_size, (4 * 20,), generator=torch.Generator().manual_seed(0))
    whole = perplexity_of_ids(model, ids, 20, device="cpu", progress=False, mode="whole")
    block = perplexity_of_ids(model, ids, 20, device="cpu", progress=False, mode="blockwise")
    assert block["mode"] == "blockwise" and whole["mode"] == "whole"
    assert block["mean_nll"] == pytest.approx(whole["mean_nll"], rel=1e-6)


def test_bf16_checkpoint_stays_bf16_and_is_computed_in_fp32(tmp_path, tiny_model_dir, one_thread):
    """A bf16 checkpoint is loaded as bf16 (never widened as a whole); compression and
    evaluation run each block in fp32 on the CPU; the compressed model is bf16 again."""
    import capllm
    from capllm.data.calibration import CalibrationConfig
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ref_dir = tmp_path / "bf16"
    m.to(torch.bfloat16).save_pretrained(ref_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (ref_dir / f).write_bytes((tiny_model_dir / f).read_bytes())
    model, tok = capllm.load_model(str(ref_dir))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert choose_mode(model, torch.device("cpu")) == "blockwise"
    text = tmp_path / "t.txt"
    from conftest import TEXT

    text.write_text(TEXT)
    cfg = capllm.CompressConfig(method="sparsegpt", ratio=0.5, calibration=CalibrationConfig(str(text), 4, 32, 0), device="cpu", progress=False)
    res = capllm.compress(model, tok, cfg)
    assert res["compute_dtype"] == "float32" and res["stored_dtype"] == "bfloat16"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    kept = res["params"]
    assert kept  # the result is recorded
    ppl = capllm.evaluate_perplexity(model, tok, capllm.PerplexityConfig(dataset=str(text), seqlen=32, max_windows=3), device="cpu", progress=False)
    assert ppl["mode"] == "blockwise" and ppl["value"] > 1


def test_each_block_gets_its_own_arguments(one_thread):
    """Gemma 3 calls its sliding-window and global layers with different masks and rotary
    tables: the capture must record each block's own (the engine replays them)."""
    from capllm.engine.capture import capture_block_inputs
    from capllm.models.layers import find_decoder_blocks
    from test_backward import make_model

    model = make_model("gemma3")
    _, blocks = find_decoder_blocks(model)
    windows = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    cap = capture_block_inputs(model, blocks, windows, torch.device("cpu"))
    assert len(cap.per_block) == len(blocks) and len(cap.hidden) == 2
    kw0, kw1 = cap.per_block[0][1][0], cap.per_block[1][1][0]
    differs = any(not _same(kw0.get(k), kw1.get(k)) for k in set(kw0) | set(kw1))
    assert differs  # sliding vs full attention
    assert cap.per_block[0][1][0] is cap.per_block[0][1][1]  # identical windows' arguments are stored once


def _same(a, b):
    from capllm.engine.capture import _same as same

    return same(a, b)


def test_releasing_checkpoint_pages_never_changes_the_model(tiny_model_dir, tmp_path, one_thread):
    """Replaced weights of a memory-mapped checkpoint give their pages back (madvise); a model
    loaded from the file and the same model held in ordinary memory compress to the same logits."""
    import copy

    import capllm
    from capllm.data.calibration import CalibrationConfig
    from capllm.utils import _checkpoint_maps
    from conftest import TEXT

    mapped, tok = capllm.load_model(str(tiny_model_dir))
    assert _checkpoint_maps()  # transformers maps the safetensors file
    plain = copy.deepcopy(mapped)
    for p in plain.parameters():
        p.data = p.data.clone()
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    cfg = capllm.CompressConfig(method="cap", ratio=0.5, calibration=CalibrationConfig(str(text), 3, 24, 0), device="cpu", progress=False,
                                options=(("rpca_max_iter", 6), ("stage1_dir", str(tmp_path / "s1")), ("guard", "none")))  # the global allocation keeps low-rank parts here
    capllm.compress(mapped, tok, cfg)
    capllm.compress(plain, tok, cfg)
    ids = torch.randint(0, len(tok), (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(mapped(ids).logits, plain(ids).logits)
    assert any(type(m).__name__ == "LowRankSparseLinear" for m in mapped.modules())  # the replacing path ran


def test_clean_release_keeps_written_weights(tiny_model_dir, one_thread):
    """``clean_only`` drops the mapped pages of weights that were only read — a later read
    gives the file's bytes, the same — and never those written since loading."""
    import capllm
    from capllm.utils import release_host_pages

    model, _ = capllm.load_model(str(tiny_model_dir))
    ws = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    before = [w.detach().clone() for w in ws]
    with torch.no_grad():
        ws[0][0, :4] += 1.0
        before[0][0, :4] += 1.0
    release_host_pages([w.data for w in ws], clean_only=True)
    assert all(torch.equal(w, b) for w, b in zip(ws, before))


def test_blocks_are_found_when_block_0_is_all_low_rank(one_thread):
    """After compression block 0 may hold no plain linear at all (every matrix low-rank +
    sparse); the decoder stack must still be found, e.g. by the block-wise evaluator."""
    from capllm.engine.context import CompressionContext
    from capllm.methods.base import CompressedWeight
    from capllm.models.layers import find_decoder_blocks
    from conftest import tiny_model

    model = tiny_model("llama")
    ctx = CompressionContext(model, None, torch.device("cpu"), progress=False)
    for h in [h for h in ctx.linears if h.block_index == 0]:
        m, n = h.shape
        ctx.apply(h, CompressedWeight(S=h.weight_copy(), U=torch.zeros(m, 1), V=torch.zeros(n, 1)))
    path, blocks = find_decoder_blocks(model)
    assert path == "model.layers" and len(blocks) == 2
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(0))
    assert perplexity_of_ids(model, ids, 20, device="cpu", progress=False)["mode"] == "blockwise"


@pytest.mark.parametrize("method", ["sparsegpt", "cap"])
def test_finished_blocks_live_in_their_checkpoint_files(tiny_model_dir, tmp_path, one_thread, method):
    """With a work directory every finished block's written tensors are views of its block file's
    memory map (the compressed model is on disk, not in anonymous memory) — and the model is the
    same, logit for logit, as one compressed without a work directory."""
    import capllm
    from capllm.data.calibration import CalibrationConfig
    from capllm.models.layers import find_linears
    from conftest import TEXT

    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    opts = (("rpca_max_iter", 6), ("stage1_dir", str(tmp_path / "s1"))) if method == "cap" else ()
    models = {}
    for tag, work in (("disk", tmp_path / "work"), ("ram", None)):
        model, tok = capllm.load_model(str(tiny_model_dir))
        cfg = capllm.CompressConfig(method=method, ratio=0.5, calibration=CalibrationConfig(str(text), 3, 24, 0), device="cpu", progress=False,
                                    options=opts, work_dir=None if work is None else str(work))
        capllm.compress(model, tok, cfg)
        models[tag] = model
    maps = {}
    for line in open("/proc/self/maps"):
        parts = line.split()
        if len(parts) >= 6 and "/passes/" in parts[5] and parts[5].endswith(".safetensors"):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            maps[(lo, hi)] = parts[5]
    written = [p for h in find_linears(models["disk"]) for n, p in h.module.named_parameters() if n in ("weight", "S", "U", "V")]
    assert written
    homes = [next((f for (lo, hi), f in maps.items() if lo <= p.data_ptr() < hi), None) for p in written]
    assert all(f is not None and "/block_" in f for f in homes), homes
    ids = torch.randint(0, len(tok), (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(models["disk"](ids).logits, models["ram"](ids).logits)
