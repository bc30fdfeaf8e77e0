"""Heat maps of CAP's allocation: what each layer and module kept.

Three panels, rows = decoder blocks, columns = module kinds (q, k, v, o, gate, up, down, …):
kept rank as a fraction of ``min(m, n)``, kept sparse entries as a fraction of ``m·n``, and
the matrix's kept parameters as a fraction of its dense size (1 − its own compression ratio).
"""

from __future__ import annotations

import re
from pathlib import Path


def _grid(rows: list[dict], key) -> tuple[list[int], list[str], list[list[float]]]:
    cells: dict[tuple[int, str], float] = {}
    blocks, modules = set(), []
    for r in rows:
        m = re.search(r"\.(\d+)\.(.+)$", r["name"])
        if not m:
            continue
        b, mod = int(m.group(1)), m.group(2).split(".")[-1]
        blocks.add(b)
        if mod not in modules:
            modules.append(mod)
        cells[(b, mod)] = key(r)
    bl = sorted(blocks)
    return bl, modules, [[cells.get((b, mod), float("nan")) for mod in modules] for b in bl]


def plot_allocation(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Write the heat map PNG for ``rows`` (result.json ``method_results.allocation``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("kept rank / min(m, n)", lambda r: r["rank_kept"] / min(r["shape"])),
        ("kept sparse entries / (m·n)", lambda r: r["nnz_kept"] / (r["shape"][0] * r["shape"][1])),
        ("kept parameters / dense", lambda r: r["kept_fraction"]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.22 * max(10, len({r['name'].rsplit('.', 2)[0] for r in rows})) + 2), constrained_layout=True)
    for ax, (label, key) in zip(axes, panels):
        blocks, modules, grid = _grid(rows, key)
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-9, max(v for row in grid for v in row if v == v)))
        ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right")
        ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
        ax.set_ylabel("block")
        ax.set_title(label, fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
