"""Shared fixtures: tiny random models of several architectures, a real tokenizer trained on the
spot, and a small text corpus — everything built inside the test, nothing downloaded."""

from __future__ import annotations

import os

from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "All that glitters is not gold. The early bird catches the worm, but the second mouse gets the cheese. "
    "Rivers flow to the sea and mountains rise above the clouds; cities grow where the roads meet. "
) * 40


def tiny_config(arch: str, vocab: int = 128):
    from transformers import GPT2Config, LlamaConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=vocab)
    if arch == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    if arch == "opt":
        return OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64, **common)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", seed: int = 0, vocab: int = 128):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab), dtype=torch.float32)
    model.eval()
    return model


def train_tokenizer(vocab: int = 128):
    """A real byte-level BPE tokenizer trained on TEXT, wrapped for transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    return fast


@pytest.fixture
def text_file(tmp_path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture
def tiny_model_dir(tmp_path) -> Path:
    """A tiny LLaMA checkpoint with a trained tokenizer, saved like any HF model directory."""
    tok = train_tokenizer(vocab=300)
    model = tiny_model("llama", vocab=len(tok))
    d = tmp_path / "tiny-llama"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


_USER_CACHE = os.environ.get("CAPLLM_CACHE")  # as the session found it (None: ~/.cache/capllm)


@pytest.fixture(autouse=True, scope="session")
def _one_kernel_build(tmp_path_factory):
    """One build of the CPU kernel for the whole session, shared by every test and subprocess
    (each test has its own CAPLLM_CACHE, and a fresh process would compile it again). Also a
    session-wide CAPLLM_CACHE, so module-scoped fixtures (which run before any test's own) stay
    out of the user's cache too."""
    os.environ["CAPLLM_KERNEL_CACHE"] = str(tmp_path_factory.getbasetemp() / "kernels")
    os.environ["CAPLLM_CACHE"] = str(tmp_path_factory.getbasetemp() / "capllm-cache-session")
    yield
    os.environ.pop("CAPLLM_KERNEL_CACHE", None)
    if _USER_CACHE is None:
        os.environ.pop("CAPLLM_CACHE", None)
    else:
        os.environ["CAPLLM_CACHE"] = _USER_CACHE


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path, monkeypatch):
    """Keep fast tests out of the user's cache; slow real-model tests share it (one download)."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("CAPLLM_CACHE", str(tmp_path / "capllm-cache"))
    elif _USER_CACHE is None:
        monkeypatch.delenv("CAPLLM_CACHE", raising=False)
    else:
        monkeypatch.setenv("CAPLLM_CACHE", _USER_CACHE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def one_thread():
    """Tiny models: one thread. On a busy 2-core machine a 2-thread OpenMP region costs ~5 ms per op
    (150× a 1-thread tiny matmul), which would dominate these tests."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_calibration(vocab=128, n=4, L=32, seed=0):
    """``n`` seeded random windows of ``L`` token ids: calibration for tiny random models."""
    from capllm.data.calibration import CalibrationSet
    from capllm.data.sources import TextSource

    g = torch.Generator().manual_seed(seed)
    return CalibrationSet(torch.randint(0, vocab, (n, L), generator=g), TextSource("random", "none", "", "test", 0), seed)


def random_layer(m=48, n=64, tokens=512, seed=0, correlated=True):
    """A random weight ``(m, n)`` and inputs ``(tokens, n)``; ``correlated``: unequal scales and
    correlations between input features, like real activations."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g)
    X = torch.randn(tokens, n, generator=g)
    if correlated:
        mix = torch.randn(n, n, generator=g) / n**0.5 + torch.eye(n)
        X = (X @ mix) * torch.linspace(0.2, 3.0, n)
    return W, X


def run_layer_compressor(method: str, W, X, ratio=0.5, structure=None, **opts):
    """One matrix through ``method``'s layer compressor, inputs fed in several batches."""
    from capllm.methods.base import Structure, get_method

    meth = get_method(method)(ratio, Structure.parse(structure), opts)

    class H:  # the minimal LinearHandle surface a compressor needs
        shape = tuple(W.shape)
        module = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)

    comp = meth.layer_compressor(H)
    for chunk in X.split(100):  # several batches: accumulation must not depend on batching
        comp.add_batch(chunk.unsqueeze(0), None)
    cw = comp.compress(W.clone())
    comp.free()
    return cw
