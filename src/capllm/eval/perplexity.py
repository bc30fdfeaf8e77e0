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
    mode: str = "auto"  # auto | whole | blockwise (see choose_mode)


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


def _fits(model, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    need = sum(p.numel() * p.element_size() for p in model.parameters())
    free, _ = torch.cuda.mem_get_info(device)
    return need < 0.8 * free


def choose_mode(model, device: torch.device, mode: str = "auto", compute_dtype: torch.dtype | None = None) -> str:
    """``whole`` (the model's own forward) or ``blockwise`` (one decoder block at a time, upcast).

    ``auto`` takes ``blockwise`` on a CPU (its memory is one block plus the windows' hidden
    states, and the logits of 128 tokens at a time instead of a window's ``L × vocab``), and on a
    GPU when the model is stored in another dtype than the one to compute in or does not fit;
    ``whole`` otherwise. The two agree to float rounding (tested).
    """
    if mode not in ("auto", "whole", "blockwise"):
        raise CapllmError(f"perplexity mode {mode!r}: use auto, whole or blockwise")
    if mode != "auto":
        return mode
    compute = compute_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    stored = next(model.parameters()).dtype
    if device.type == "cpu" or stored != compute:
        return "blockwise"
    return "whole" if _fits(model, device) else "blockwise"


@torch.no_grad()
def blockwise_window_nll(model, windows: torch.Tensor, device: torch.device, compute_dtype: torch.dtype, progress: bool = False, desc: str = "perplexity",
                         around_block=None, start: int = 0, start_hidden: list[torch.Tensor] | None = None, on_block_input=None) -> torch.Tensor:
    """Summed next-token NLL (fp64) of each window, running the decoder one block at a time.

    Only one block is on ``device`` (cast to ``compute_dtype``) at a time; the hidden states of
    every window wait on CPU between blocks; the head (final norm, LM head, soft-capping) runs on
    the last block's outputs (:class:`capllm.engine.head.Head`). The same function as the whole
    model's forward, in bounded memory. ``around_block(i, block)``: a context manager entered
    while block ``i`` runs on the device (e.g. to run it with other weights; the evaluator itself
    knows no method). ``start``, ``start_hidden``: begin at block ``start`` from these hidden states
    (what block ``start`` received in an earlier call whose blocks before it were the same);
    ``on_block_input(i, hidden)`` is told each block's inputs before it runs (e.g. to keep them
    for such a later call).
    """
    import contextlib

    from capllm.engine.capture import block_to, capture_block_inputs, cast_floats, release_block, stored_dtype
    from capllm.engine.head import Head
    from capllm.engine.layerwise import place_outside_blocks
    from capllm.models.layers import find_decoder_blocks

    _, blocks = find_decoder_blocks(model)
    cpu = torch.device("cpu")
    place_outside_blocks(model, device)
    captured = capture_block_inputs(model, blocks, windows, device, cpu)
    if start and (start_hidden is None or len(start_hidden) != len(windows)):
        raise ValueError(f"starting at block {start} needs that block's inputs for all {len(windows)} windows")
    hidden = [h.to(compute_dtype) for h in (start_hidden if start else captured.hidden)]
    for i, block in enumerate(tqdm(blocks, desc=f"{desc}: blocks", disable=not progress, unit="block")):
        if i < start:
            continue
        if on_block_input is not None:
            on_block_input(i, hidden)
        keep = stored_dtype(block)
        block_to(block, device, compute_dtype)
        args, kwargs = captured.per_block[i]
        with around_block(i, block) if around_block is not None else contextlib.nullcontext():
            for s in range(len(hidden)):  # in place: one window's old and new states at a time
                out = block(hidden[s].to(device), *cast_floats(args[s], device, compute_dtype), **cast_floats(kwargs[s], device, compute_dtype))
                hidden[s] = (out[0] if isinstance(out, (tuple, list)) else out).to(cpu)
        block_to(block, cpu, keep)
        release_block(block)
    head = Head(model, device)
    sums = [float(head.loss(h.to(device), windows[s], chunk=128).double()) for s, h in enumerate(hidden)]  # 128 tokens' logits at a time
    model.to(cpu)
    return torch.tensor(sums, dtype=torch.float64)


@torch.no_grad()
def perplexity_of_ids(model, ids: torch.Tensor, seqlen: int, max_windows: int | None = None, batch_size: int = 1, device: torch.device | str = "cpu", progress: bool = True,
                      desc: str = "perplexity", mode: str = "auto", dist=None) -> dict:
    """Perplexity of a 1-D token stream, with every knob and count recorded (``mode``: :func:`choose_mode`).

    ``dist`` (:class:`capllm.engine.distributed.Dist`): each rank scores its contiguous share of
    the windows and the per-window losses are gathered in window order — each is computed exactly
    as in one process, so the figure is the same bit for bit."""
    device = torch.device(device)
    total_windows = ids.numel() // seqlen
    if total_windows == 0:
        raise CapllmError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    nwin = total_windows if max_windows is None else min(max_windows, total_windows)
    if nwin < 1:
        raise CapllmError("--max-windows must be ≥ 1")
    windows = ids[: nwin * seqlen].view(nwin, seqlen)
    mine = slice(0, nwin) if dist is None or not dist.enabled else dist.shard(nwin)
    windows = windows[mine]
    was_training = model.training
    model.eval()
    mode = choose_mode(model, device, mode)
    t0 = time.perf_counter()
    sums = []
    if len(windows) == 0:
        pass  # more ranks than windows: this rank has none to score
    elif mode == "blockwise":
        sums = blockwise_window_nll(model, windows, device, torch.bfloat16 if device.type == "cuda" else torch.float32, progress, desc).tolist()
    else:
        model.to(device)
        bar = tqdm(total=len(windows), desc=desc, disable=not progress, unit="win")
        for b in range(0, len(windows), batch_size):
            nll = window_nll(model, windows[b : b + batch_size], device)
            sums.extend(nll.tolist())
            bar.update(len(nll))
        bar.close()
    if dist is not None and dist.enabled:
        sums = [v for part in dist.all_gather_object(sums) for v in part]  # contiguous shards: window order
    for j, v in enumerate(sums):
        if not math.isfinite(v):
            raise CapllmError(f"non-finite loss in evaluation window {j} (tokens {j * seqlen}–{(j + 1) * seqlen - 1}): the model produces NaN/Inf")
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
        "mode": mode,
        "time_s": round(time.perf_counter() - t0, 3),
    }


def evaluate_perplexity(model, tokenizer, cfg: PerplexityConfig = PerplexityConfig(), device: torch.device | str = "cpu", progress: bool = True, source: TextSource | None = None,
                        dist=None) -> dict:
    """Perplexity of ``model`` on ``cfg.dataset`` (see the module docstring). Returns the result.json block."""
    source = source or load_text(cfg.dataset, cfg.split, cfg.data_dir, purpose="eval")
    ids = tokenize_text(tokenizer, source.text)
    seqlen = resolve_seqlen(model, cfg.seqlen)
    res = perplexity_of_ids(model, ids, seqlen, cfg.max_windows, cfg.batch_size, device, progress, desc=f"ppl {source.name}", mode=cfg.mode, dist=dist)
    return {"dataset": source.name, "split": source.split, "origin": source.origin, "bos": describe_bos(tokenizer, ids), **res}
