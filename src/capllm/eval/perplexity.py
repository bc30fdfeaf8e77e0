"""Perplexity by the SparseGPT/Wanda protocol (DESIGN §4).

The evaluation documents are joined with ``"\\n\\n"`` and tokenised once; the token stream is
cut into non-overlapping windows of ``seqlen`` tokens; each window is scored independently and

    ppl = exp( Σ_windows Σ_{t=1}^{L-1} −log p(x_t | x_<t)  /  Σ_windows (L − 1) )

i.e. the mean NLL over every predicted token. ``max_windows`` scores only the first windows (for
CPU runs; recorded). The tokens after the last full window (fewer than ``seqlen``) are not
scored, as in the reference protocol, and their count is recorded. A non-finite loss is an error
that names the window — no window is ever dropped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from capllm.data.calibration import tokenize_text
from capllm.data.sources import TextSource, load_text
from capllm.errors import CapllmError


@dataclass(frozen=True)
class PerplexityConfig:
    dataset: str = "auto"
    split: str = "test"
    seqlen: int | None = None  # None: 2048 capped by the model's maximum
    max_windows: int | None = None
    batch_size: int = 1
    data_dir: str | None = None


def model_max_length(model) -> int | None:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def resolve_seqlen(model, seqlen: int | None) -> int:
    cap = model_max_length(model)
    if seqlen is None:
        return min(2048, cap) if cap else 2048
    if seqlen < 2:
        raise CapllmError(f"--seqlen {seqlen} is too small: a window needs at least 2 tokens")
    if cap and seqlen > cap:
        raise CapllmError(f"--seqlen {seqlen} exceeds the model's maximum of {cap} positions")
    return seqlen


def describe_bos(tokenizer, ids: torch.Tensor) -> str:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and ids.numel() and int(ids[0]) == bos:
        return "tokenizer adds BOS once at the start of the text (first window only)"
    return "none (tokenizer adds no BOS; windows start mid-text)"


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Summed next-token NLL (fp64) of each window in a ``(B, L)`` batch."""
    logits = model(windows.to(device), use_cache=False).logits
    logits = logits[:, :-1, :].float()
    target = windows[:, 1:].to(device)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return nll.view(windows.shape[0], -1).double().sum(1).cpu()


@torch.no_grad()
def perplexity_of_ids(model, ids: torch.Tensor, seqlen: int, max_windows: int | None = None, batch_size: int = 1, device: torch.device | str = "cpu", progress: bool = True, desc: str = "perplexity") -> dict:
    """Perplexity of a 1-D token stream, with every knob and count recorded."""
    device = torch.device(device)
    total_windows = ids.numel() // seqlen
    if total_windows == 0:
        raise CapllmError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    nwin = total_windows if max_windows is None else min(max_windows, total_windows)
    if nwin < 1:
        raise CapllmError("--max-windows must be ≥ 1")
    windows = ids[: nwin * seqlen].view(nwin, seqlen)
    was_training = model.training
    model.eval()
    model.to(device)
    t0 = time.perf_counter()
    sums = []
    bar = tqdm(total=nwin, desc=desc, disable=not progress, unit="win")
    for b in range(0, nwin, batch_size):
        nll = window_nll(model, windows[b : b + batch_size], device)
        for j, v in enumerate(nll.tolist()):
            if not math.isfinite(v):
                raise CapllmError(f"non-finite loss in evaluation window {b + j} (tokens {(b + j) * seqlen}–{(b + j + 1) * seqlen - 1}): the model produces NaN/Inf")
        sums.extend(nll.tolist())
        bar.update(len(nll))
    bar.close()
    model.train(was_training)
    predicted = nwin * (seqlen - 1)
    mean_nll = math.fsum(sums) / predicted
    return {
        "seqlen": seqlen,
        "windows": nwin,
        "windows_available": total_windows,
        "tokens": predicted,
        "input_tokens": nwin * seqlen,
        "text_tokens": ids.numel(),
        "tail_tokens_unscored": ids.numel() - total_windows * seqlen,
        "mean_nll": mean_nll,
        "value": math.exp(mean_nll),
        "time_s": round(time.perf_counter() - t0, 3),
    }


def evaluate_perplexity(model, tokenizer, cfg: PerplexityConfig = PerplexityConfig(), device: torch.device | str = "cpu", progress: bool = True, source: TextSource | None = None) -> dict:
    """Perplexity of ``model`` on ``cfg.dataset`` (see the module docstring). Returns the result.json block."""
    source = source or load_text(cfg.dataset, cfg.split, cfg.data_dir, purpose="eval")
    ids = tokenize_text(tokenizer, source.text)
    seqlen = resolve_seqlen(model, cfg.seqlen)
    res = perplexity_of_ids(model, ids, seqlen, cfg.max_windows, cfg.batch_size, device, progress, desc=f"ppl {source.name}")
    return {"dataset": source.name, "split": source.split, "origin": source.origin, "bos": describe_bos(tokenizer, ids), **res}
