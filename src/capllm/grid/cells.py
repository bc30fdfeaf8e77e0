"""A grid directory's finished cells: ``DIR/cells/<cell>/result.json``, read by the runner (to
skip finished cells) and by the report. A cell counts as finished only when its ``result.json``
parses as a compress result; anything else is unfinished.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_result(cell_dir: Path) -> dict[str, Any] | None:
    """The cell's result.json, or None when it is missing or unreadable."""
    try:
        res = json.loads((cell_dir / "result.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return res if isinstance(res, dict) and "method" in res else None


def load_cells(root: Path, names: list[str] | None = None) -> list[dict[str, Any]]:
    """Finished cells' results (in ``names`` order when given), each with ``_cell`` set to its name."""
    cells_dir = Path(root) / "cells"
    if names is None:
        names = sorted(p.name for p in cells_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) if cells_dir.is_dir() else []
    out = []
    for n in names:
        res = read_result(cells_dir / n)
        if res is not None:
            out.append({**res, "_cell": n})
    return out
