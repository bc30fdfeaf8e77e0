"""Tokenised calibration windows and evaluation token streams.

Calibration follows SparseGPT/Wanda: the documents are joined with ``"\\n\\n"`` and tokenised
once; ``nsamples`` windows of ``seqlen`` tokens start at offsets drawn by
``random.Random(seed).randint(0, ntokens - seqlen - 1)`` — the same offsets as
``random.seed(seed)`` followed by ``random.randint`` in the reference scripts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from capllm.data.sources import TextSource, load_text
from capllm.errors import CapllmError
from capllm.utils import trim_heap


@dataclass(frozen=True)
class CalibrationConfig:
    dataset: str = "auto"
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    data_dir: str | None = None


@dataclass
class CalibrationSet:
    """``windows``: ``(nsamples, seqlen)`` token ids; ``source`` names where the text came from."""

    windows: torch.Tensor
    source: TextSource
    seed: int
    # windows drawn after ``windows`` from the same seeded stream (so ``windows`` are what they
    # would be without them), kept out of every statistic: a method's check of its own choice
    held_out: torch.Tensor | None = None

    def describe(self) -> dict:
        n, L = self.windows.shape
        return {"dataset": self.source.name, "split": self.source.split, "origin": self.source.origin,
                "nsamples": n, "seqlen": L, "seed": self.seed, "tokens": n * L}


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as one 1-D tensor, exactly as the tokenizer produces them."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silence "sequence longer than the model maximum"
    try:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids[0].clone()
    finally:
        hf_logging.set_verbosity(verbosity)
    trim_heap()  # the tokenizer's buffers for a few MB of text are hundreds of MB of freed heap
    return ids


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets."""
    if nsamples < 1 or seqlen < 2:
        raise CapllmError(f"calibration needs nsamples ≥ 1 and seqlen ≥ 2 (got {nsamples}, {seqlen})")
    if ids.numel() <= seqlen + 1:
        raise CapllmError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}: use a larger dataset or a smaller --seqlen")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def load_calibration(tokenizer, cfg: CalibrationConfig, held_out: int = 0) -> CalibrationSet:
    """``cfg.nsamples`` windows, and ``held_out`` more from the same stream kept apart."""
    split = "train" if cfg.dataset in ("wikitext2", "c4", "enwiki") else "validation"
    source = load_text(cfg.dataset, split, cfg.data_dir, purpose="calib")
    ids = tokenize_text(tokenizer, source.text)
    w = sample_windows(ids, cfg.nsamples + held_out, cfg.seqlen, cfg.seed)
    return CalibrationSet(w[: cfg.nsamples], source, cfg.seed, w[cfg.nsamples :] if held_out else None)
