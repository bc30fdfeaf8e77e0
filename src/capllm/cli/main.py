"""``capllm`` — the command-line tool.

Each subcommand is a module of this package with ``add_parser(subparsers)`` and ``run(args)``;
:data:`SUBCOMMANDS` lists them in help order. Every user error is one line on stderr and exit
status 2; running out of memory is one line and status 3.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from capllm.errors import CapllmError, is_out_of_memory

SUBCOMMANDS = ["compress", "decompose", "eval", "bench", "generate", "download", "methods"]
_MODULE = {"eval": "evaluate"}  # subcommand → module name where they differ


def _module(cmd: str):
    return importlib.import_module(f"capllm.cli.{_MODULE.get(cmd, cmd)}")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="capllm", description="Compress pretrained LLMs: low-rank + sparse with global allocation (CAP) and the baselines.")
    ap.add_argument("--version", action="store_true", help="print the version and exit")
    sub = ap.add_subparsers(dest="cmd")
    for cmd in SUBCOMMANDS:
        _module(cmd).add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    from capllm.utils import tune_malloc

    tune_malloc()
    ap = _parser()
    a = ap.parse_args(argv)
    if a.version:
        from capllm.results import capllm_version

        print(capllm_version())
        return 0
    if a.cmd is None:
        ap.print_help()
        return 2
    if getattr(a, "quiet", False):  # also the libraries' own bars (transformers' "Loading weights")
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            try:
                return _run(a)
            finally:
                hf_logging.enable_progress_bar()
    return _run(a)


def _run(a: argparse.Namespace) -> int:
    """Run one parsed subcommand; a CapllmError or running out of memory becomes one line and an exit code."""
    try:
        return _module(a.cmd).run(a)
    except CapllmError as exc:
        rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else "0"
        print(f"capllm: error: {'' if rank == '0' else f'(rank {rank}) '}{exc}", file=sys.stderr)
        return exc.exit_code
    except (MemoryError, RuntimeError) as exc:
        if is_out_of_memory(exc):
            print("capllm: error: out of memory: use fewer/shorter calibration windows (--nsamples, --seqlen), a shorter --eval-seqlen, or a larger machine", file=sys.stderr)
            return 3
        raise
    except KeyboardInterrupt:
        print("capllm: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
