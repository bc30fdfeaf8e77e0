"""The allocation guard's held-out loss along the line from the uniform split to the global one.

CAP's guard (:mod:`capllm.allocate.guard`) measures, on held-out calibration windows and with
Stage 1's values, the loss of the global allocation (α = 1), of the uniform split (α = 0) and of
the mixes ``mixα`` (every matrix's count ``(1 − α) n_uniform + α n_global``). This script reads
the ``method_results.guard`` records of finished cells and draws that loss against α, one curve
per model, with the loss relative to the uniform split's so that models of different loss levels
share one axis; it also writes the points as JSON and a Markdown table.

    python benchmarks/guard_curve.py benchmarks/results/quality/*-2026-12-03/cap-*.json \\
        --out benchmarks/results/quality/guard-curve --plot docs/guard-mix.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def alpha_of(name: str) -> float | None:
    """α of an alternative's name: uniform 0, global 1, mixα α (the guard's own parser); block and others: None."""
    from capllm.allocate.run import mix_alpha

    return {"uniform": 0.0, "global": 1.0}.get(name, mix_alpha(name))


def curves(cells: list[dict]) -> dict[str, dict]:
    """One curve per (model, ratio): the cell with the most points on the line wins (cells that
    re-measure the same guard agree to the last digit: same windows, same Stage 1 values)."""
    out: dict[str, dict] = {}
    for r in cells:
        g = (r.get("method_results") or {}).get("guard") or {}
        pts = sorted((a, v) for k, v in (g.get("losses") or {}).items() if (a := alpha_of(k)) is not None)
        if len(pts) < 3:
            continue
        key = f"{r['model']['name']} {round(100 * r['ratio'])} %"
        if key not in out or len(pts) > len(out[key]["points"]):
            out[key] = {"points": pts, "chosen": g.get("chosen"), "windows": g.get("windows"), "seqlen": g.get("seqlen")}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cells", nargs="+", type=Path, help="result.json files of CAP cells whose guard measured mixes")
    ap.add_argument("--out", type=Path, required=True, help="directory for guard_curve.json and guard_curve.md")
    ap.add_argument("--plot", type=Path, help="PNG of the curves")
    a = ap.parse_args(argv)
    cs = curves([json.loads(p.read_text()) for p in a.cells])
    if not cs:
        raise SystemExit("guard_curve: no cell has a guard record with the uniform, global and a mix loss")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "guard_curve.json").write_text(json.dumps(cs, indent=1))
    alphas = sorted({p for c in cs.values() for p, _ in c["points"]})
    lines = ["| model | " + " | ".join(f"α = {x:g}" for x in alphas) + " | chosen |", "|---" * (len(alphas) + 2) + "|"]
    for k, c in cs.items():
        d = dict(c["points"])
        lines.append(f"| {k} | " + " | ".join(f"{d[x]:.3f}" if x in d else "" for x in alphas) + f" | {c['chosen']} |")
    (a.out / "guard_curve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for k, c in cs.items():
            xs, ys = zip(*c["points"])
            base = dict(c["points"])[0.0]
            ax.plot(xs, [y - base for y in ys], marker="o", label=f"{k} (chosen {c['chosen']})")
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_xlabel("α: 0 = uniform split, 1 = global allocation")
        ax.set_ylabel("held-out loss − uniform's (nats)")
        ax.set_title("CAP's guard: held-out loss along the mix", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        a.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(a.plot, dpi=130)
        print(f"plot: {a.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
