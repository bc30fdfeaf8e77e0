"""``capllm generate``: continue a prompt with a (compressed or dense) model."""

from __future__ import annotations

import sys
import time

from capllm.errors import CapllmError

HELP = "generate text from a prompt with a dense or compressed model"


def add_parser(sub) -> None:
    from capllm.models.loader import DEFAULT_MODEL

    g = sub.add_parser("generate", help=HELP)
    g.add_argument("prompt", help="the text to continue")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"built-in alias, local directory (dense or capllm compressed), .gguf file or hub id (default {DEFAULT_MODEL})")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--greedy", action="store_true", help="greedy decoding (default: sampling)")
    g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (ignored with --greedy)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (ignored with --greedy)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    g.add_argument("--execution", default="auto", choices=("auto", "kernel", "dense", "csr"),
                   help="compressed models: how each sparse part runs — auto measures once per layer (packed bitmask kernel, dense or CSR)")
    g.add_argument("--sparse-dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compressed models: store the kernel layers' non-zeros in this dtype (bf16: fewer bytes per token, each value rounded once)")


def run(a) -> int:
    import torch

    from capllm.format import describe_execution
    from capllm.models.loader import load_model
    from capllm.utils import resolve_device

    if a.max_new_tokens < 1:
        raise CapllmError(f"--max-new-tokens {a.max_new_tokens}: must be at least 1")
    if not a.greedy and not a.temperature > 0:
        raise CapllmError(f"--temperature {a.temperature}: must be > 0 (or pass --greedy)")
    device = resolve_device(a.device)
    t0 = time.perf_counter()
    model, tok = load_model(a.model, device=device, execution=a.execution, sparse_dtype=a.sparse_dtype)
    load_s = time.perf_counter() - t0
    if tok is None:
        raise CapllmError(f"{a.model} has no tokenizer: save the model with its tokenizer to generate text")
    ids = tok(a.prompt, return_tensors="pt").input_ids.to(device)
    if ids.shape[1] == 0:
        raise CapllmError("the prompt is empty after tokenization: give some text")
    torch.manual_seed(a.seed)
    sampling = {} if a.greedy else {"temperature": a.temperature, "top_p": a.top_p, "top_k": 0}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    t1 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.max_new_tokens, do_sample=not a.greedy, pad_token_id=pad, **sampling)
    gen_s = time.perf_counter() - t1
    new = out[0, ids.shape[1]:]
    print(a.prompt + tok.decode(new, skip_special_tokens=True), flush=True)
    paths = describe_execution(model)["summary"]
    where = ", ".join(f"{n} {p}" for p, n in sorted(paths.items())) or "dense model"
    print(f"capllm: {len(new)} new tokens in {gen_s:.2f} s ({len(new) / gen_s:.1f} tok/s, {'greedy' if a.greedy else f'sampled T={a.temperature}'}); load {load_s:.2f} s; layers: {where}", file=sys.stderr)
    return 0
