"""``capllm methods``: one registered method per line, then its one-line description."""

from __future__ import annotations

HELP = "list registered methods"


def add_parser(sub) -> None:
    sub.add_parser("methods", help=HELP)


def run(a) -> int:
    from capllm.methods import REGISTRY

    width = max(map(len, REGISTRY))
    for name in sorted(REGISTRY):
        print(f"{name.ljust(width)}  {REGISTRY[name].description}")
    return 0
