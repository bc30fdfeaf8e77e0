"""Long-form generation check: does the compressed model still write what the dense model writes?

Perplexity and zero-shot accuracy score one next token at a time under teacher forcing; the CAP
reviewers asked what happens over long generations, where errors compound. This check takes
``prompts`` windows of ``prompt_tokens`` tokens from real text (evenly spaced through the
evaluation text, so every prompt has the same length and no padding is needed), lets the dense
and the compressed model each continue them greedily for ``new_tokens`` tokens (EOS suppressed,
so every continuation has exactly ``new_tokens`` tokens), and reports

* ``ppl_under_dense`` — perplexity of the compressed model's continuations *under the dense model*:
  ``exp(mean_t −log p_dense(y_t | prompt, y_<t))``. Fluent text the dense model would also
  write scores low; drift and degenerate loops score high. ``ppl_under_dense_reference`` is the same
  figure for the dense model's own greedy continuations (the floor).
* ``agreement`` — fraction of the ``prompts × new_tokens`` positions where the compressed
  continuation has the same token as the dense one, and ``prefix_match`` — mean number of
  leading tokens identical to the dense continuation (where they first diverge).
* ``distinct_4`` — distinct 4-grams / all 4-grams of the continuations (1.0 = no repetition;
  greedy loops drive it down), for both models.

The dense continuations depend only on the model, the prompts and the settings; they are cached
under ``$CAPLLM_CACHE`` like the dense perplexity.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from capllm.data.calibration import tokenize_text
from capllm.errors import CapllmError
from capllm.utils import cache_dir, json_cache_get, json_cache_put


@dataclass(frozen=True)
class GenerationConfig:
    prompts: int = 8
    prompt_tokens: int = 64
    new_tokens: int = 256
    batch_size: int = 8
    # Decode steps are tiny matmuls: with 2 OpenMP threads on a busy 2-core machine they ran 10×
    # slower than with 1 (SmolLM2-135M, 8×32 tokens: 80 s vs 7.9 s). None keeps torch's setting.
    decode_threads: int | None = 1


def make_prompts(tokenizer, text: str, cfg: GenerationConfig) -> torch.Tensor:
    """``(prompts, prompt_tokens)`` ids: windows starting at evenly spaced offsets of ``text``."""
    ids = tokenize_text(tokenizer, text)
    span = ids.numel() - cfg.prompt_tokens
    if cfg.prompts < 1 or cfg.prompt_tokens < 1 or cfg.new_tokens < 1:
        raise CapllmError("the generation check needs ≥ 1 prompt, ≥ 1 prompt token and ≥ 1 new token")
    if span < cfg.prompts:
        raise CapllmError(f"the prompt text has {ids.numel()} tokens, too few for {cfg.prompts} prompts of {cfg.prompt_tokens}")
    starts = [round(i * span / cfg.prompts) for i in range(cfg.prompts)]
    return torch.stack([ids[s : s + cfg.prompt_tokens] for s in starts])


@contextmanager
def _threads(n: int | None, device) -> Iterator[None]:
    if n is None or torch.device(device).type != "cpu":
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.no_grad()
def greedy(model, prompts: torch.Tensor, new_tokens: int, batch_size: int, device, threads: int | None = None) -> torch.Tensor:
    """``(n, new_tokens)`` greedy continuations (EOS suppressed: every row is full length)."""
    model.eval()
    outs = []
    with _threads(threads, device):
        for b in range(0, prompts.shape[0], batch_size):
            x = prompts[b : b + batch_size].to(device)
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, num_beams=1, pad_token_id=_pad_id(model), temperature=None, top_p=None, top_k=None)
            outs.append(y[:, x.shape[1] :].cpu())
    return torch.cat(outs)


def _pad_id(model) -> int:
    cfg = getattr(model, "generation_config", None)
    for v in (getattr(cfg, "pad_token_id", None), getattr(cfg, "eos_token_id", None), getattr(model.config, "eos_token_id", None)):
        if isinstance(v, list) and v:
            v = v[0]
        if isinstance(v, int):
            return v
    return 0


@torch.no_grad()
def continuation_nll(model, prompts: torch.Tensor, conts: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """Per-row summed NLL (fp64) of ``conts`` given ``prompts`` under ``model``."""
    P = prompts.shape[1]
    sums = []
    for b in range(0, prompts.shape[0], batch_size):
        x = torch.cat([prompts[b : b + batch_size], conts[b : b + batch_size]], 1).to(device)
        logits = model(x, use_cache=False).logits[:, P - 1 : -1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, P:].reshape(-1), reduction="none")
        sums.append(nll.view(x.shape[0], -1).double().sum(1).cpu())
    return torch.cat(sums)


def distinct_ngrams(conts: torch.Tensor, n: int = 4) -> float:
    grams = [tuple(row[i : i + n]) for row in conts.tolist() for i in range(len(row) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def agreement(conts: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(fraction of equal positions, mean length of the common prefix)."""
    eq = conts == ref
    first_diff = torch.where(eq.all(1), torch.full((eq.shape[0],), eq.shape[1]), (~eq).int().argmax(1))
    return float(eq.float().mean()), float(first_diff.float().mean())


def _ref_key(model_source: dict, prompts: torch.Tensor, cfg: GenerationConfig) -> str:
    h = hashlib.sha256(prompts.numpy().tobytes()).hexdigest()[:16]
    return hashlib.sha256(json.dumps([model_source, h, asdict(cfg), torch.__version__], sort_keys=True).encode()).hexdigest()[:24]


def dense_reference(model, prompts: torch.Tensor, cfg: GenerationConfig, device, use_cache: bool = True) -> dict[str, Any]:
    """The dense model's greedy continuations and their NLL under itself (cached per model/prompts)."""
    path = cache_dir() / "dense-generation.json"
    src = getattr(model, "_capllm_source", None)
    key = _ref_key(src, prompts, cfg) if (src and use_cache) else None
    c = json_cache_get(path, key)
    if c is not None:
        return {"continuations": torch.tensor(c["continuations"]), "nll": torch.tensor(c["nll"], dtype=torch.float64), "cached": True, "time_s": c["time_s"]}
    t0 = time.perf_counter()
    # the dense model is still where it was loaded (the CPU): run it on `device`, then put it back
    home = next(model.parameters()).device
    model.to(device)
    try:
        conts = greedy(model, prompts, cfg.new_tokens, cfg.batch_size, device, cfg.decode_threads)
        nll = continuation_nll(model, prompts, conts, cfg.batch_size, device)
    finally:
        model.to(home)
    ref = {"continuations": conts, "nll": nll, "cached": False, "time_s": round(time.perf_counter() - t0, 3)}
    json_cache_put(path, key, {"continuations": conts.tolist(), "nll": nll.tolist(), "time_s": ref["time_s"]})
    return ref


def generation_check(model, tokenizer, prompts: torch.Tensor, ref: dict[str, Any], dense_scorer: Callable[[], Any] | Any,
                     cfg: GenerationConfig, device, source: dict | None = None, examples: int = 2) -> dict[str, Any]:
    """Score ``model``'s greedy continuations against the dense reference (see the module docstring).

    ``dense_scorer`` is the dense model, or a zero-argument callable that loads it (called once,
    after the compressed model has generated, so the dense copy only lives for the scoring pass).
    """
    t0 = time.perf_counter()
    model.to(device)
    conts = greedy(model, prompts, cfg.new_tokens, cfg.batch_size, device, cfg.decode_threads)
    t_gen = time.perf_counter() - t0
    dense = dense_scorer() if callable(dense_scorer) and not isinstance(dense_scorer, torch.nn.Module) else dense_scorer
    dense.to(device)
    nll = continuation_nll(dense, prompts, conts, cfg.batch_size, device)
    del dense
    n_tok = conts.numel()
    agree, prefix = agreement(conts, ref["continuations"])
    decode = lambda t: tokenizer.decode(t, skip_special_tokens=False)  # noqa: E731
    return {
        **asdict(cfg),
        "prompt_source": source,
        "ppl_under_dense": math.exp(float(nll.sum()) / n_tok),
        "ppl_under_dense_reference": math.exp(float(ref["nll"].sum()) / ref["continuations"].numel()),
        "agreement": agree,
        "prefix_match": prefix,
        "distinct_4": distinct_ngrams(conts),
        "distinct_4_reference": distinct_ngrams(ref["continuations"]),
        "tokens": n_tok,
        "generation_time_s": round(t_gen, 3),
        "tokens_per_s": round(n_tok / t_gen, 2) if t_gen > 0 else None,
        "reference_cached": bool(ref.get("cached")),
        "examples": [{"prompt": decode(prompts[i]), "dense": decode(ref["continuations"][i]), "compressed": decode(conts[i])}
                     for i in range(min(examples, prompts.shape[0]))],
    }
