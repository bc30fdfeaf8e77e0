"""Summarise a finished `capllm bench` grid as the BENCHMARKS.md tables.

    python benchmarks/grid/summarize.py benchmarks/results/grid/smollm2-135m \
        --protocol benchmarks/results/smollm2-135m --peers benchmarks/results/peers/smollm2-135m.json

Writes ``summary.md`` and ``summary.json`` into the grid directory:

* per method and ratio: perplexity, the zero-shot mean of the CAP paper's eight tasks, the same
  mean without BoolQ (whose 500-document accuracy swings between the "always no" 38 % and the
  "always yes" 62 % as models degrade, so it moves the mean more than model quality does), the
  greedy-continuation agreement with the dense model and the device the cell ran on;
* CAP against every row at the same ratio: perplexity ratio (cap ÷ row; < 1 = CAP better) and
  zero-shot difference in points, with the binomial standard error of that difference;
* device agreement: the grid's perplexity against the CPU protocol run of the same cell
  (``benchmarks/run_protocol.py``), where one exists;
* the llm-compressor peer rows against the grid's capllm rows.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

PAPER = ("piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "rte", "openbookqa", "boolq")
ORDER = ("dense", "cap", "cap-uniform", "rpca-threshold", "sparsegpt", "wanda", "magnitude", "oats", "sslc", "losparse", "svd-llm", "asvd", "svd")


def load_grid(grid: Path) -> dict[tuple[str, float | None], dict]:
    """The finished cells of a `capllm bench` directory, by (method, ratio; None for dense)."""
    from capllm.grid.cells import load_cells

    return {(r["method"], r["ratio"] if r["method"] != "dense" else None): r for r in load_cells(grid)}


def load_protocol(folder: str | None) -> list[tuple[str, dict]]:
    """``(file stem, result)`` of every readable run_protocol.py result JSON in ``folder``."""
    out = []
    for f in sorted(Path(folder).glob("*.json")) if folder else []:
        try:
            r = json.loads(f.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and "perplexity" in r and "method" in r:
            out.append((f.stem, r))
    return out


def zs_scores(r: dict) -> dict[str, tuple[float, int]]:
    """``{task: (primary metric, documents)}`` of the paper's tasks present in ``r``."""
    z = (r.get("zeroshot") or {}).get("tasks", {})
    return {t: (z[t][z[t]["primary_metric"]], z[t]["n"]) for t in PAPER if t in z}


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def se_of_mean(scores: dict[str, tuple[float, int]]) -> float:
    """Binomial standard error of an unweighted mean of per-task accuracies."""
    k = len(scores)
    return math.sqrt(sum(p * (1 - p) / n for p, n in scores.values())) / k if k else float("nan")


def zs_summary(scores: dict[str, tuple[float, int]]) -> dict[str, float | None]:
    """The eight-task mean, the same mean without BoolQ and the mean's standard error (fractions)."""
    return {"mean": mean(p for p, _ in scores.values()), "mean_without_boolq": mean(p for t, (p, _) in scores.items() if t != "boolq"),
            "se": se_of_mean(scores)}


def zs_margin(a: dict, b: dict) -> tuple[float, float]:
    """``a − b`` of two ``zs_summary`` means in points, and its (unpaired) standard error."""
    return 100 * (a["mean"] - b["mean"]), 100 * math.hypot(a["se"], b["se"])


def fmt_ppl(x: float) -> str:
    return f"{x:.3g}" if x >= 1e4 else f"{x:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grid")
    ap.add_argument("--protocol", default=None, help="benchmarks/results/<model>/ of run_protocol.py (CPU rows) for the device comparison")
    ap.add_argument("--peers", default=None, help="benchmarks/results/peers/<model>.json")
    ap.add_argument("--peer-zeroshot", default=None, help="directory of `capllm eval --tasks` results of the peers' outputs, <peer tag>.json")
    a = ap.parse_args()
    grid = Path(a.grid)
    cells = load_grid(grid)
    protocol = load_protocol(a.protocol)
    ratios = sorted({k[1] for k in cells if k[1] is not None})
    rows, out = [], {"rows": [], "cap_vs": [], "device_agreement": [], "peers": []}
    for m in ORDER:
        for r in ([None] if m == "dense" else ratios):
            c = cells.get((m, r))
            if c is None:
                continue
            zs = zs_scores(c)
            z = zs_summary(zs)
            row = {"method": m, "ratio": r, "ppl": c["perplexity"]["value"], "zs_mean": z["mean"],
                   "zs_mean_without_boolq": z["mean_without_boolq"], "zs_se": z["se"], "tasks": len(zs), "gen_agreement": (c.get("generation") or {}).get("agreement"),
                   "device": c.get("device"), "compress_s": c["time_s"].get("compress"), "kept_linear": c["params"]["kept_linear"],
                   "options": c.get("method_options")}
            rows.append(row)
    out["rows"] = rows
    lines = ["| method | ratio | ppl | zero-shot mean (8) | mean without boolq (7) | gen agreement | compress s | device |", "|---|---|---|---|---|---|---|---|"]
    for x in rows:
        pct = lambda v: "–" if v is None else f"{100 * v:.2f}"  # noqa: E731
        ratio = "–" if x["ratio"] is None else f"{x['ratio']:.0%}"
        lines.append(f"| {x['method']} | {ratio} | {fmt_ppl(x['ppl'])} | {pct(x['zs_mean'])} ± {100 * x['zs_se']:.2f} | "
                     f"{pct(x['zs_mean_without_boolq'])} | {pct(x['gen_agreement'])} | {x['compress_s']:.0f} | {x['device']} |")
    md = ["## Every method × ratio\n", *lines, ""]
    # CAP against each row at the same ratio
    md += ["## CAP ÷ row (perplexity) and CAP − row (zero-shot points, ± 1 s.e. of the difference)\n",
           "| method | " + " | ".join(f"{r:.0%}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
    by = {(x["method"], x["ratio"]): x for x in rows}
    for m in ORDER:
        if m in ("dense", "cap"):
            continue
        cols = []
        for r in ratios:
            cap, x = by.get(("cap", r)), by.get((m, r))
            if cap is None or x is None:
                cols.append("–")
                continue
            d, se = zs_margin({"mean": cap["zs_mean"], "se": cap["zs_se"]}, {"mean": x["zs_mean"], "se": x["zs_se"]})
            cols.append(f"{cap['ppl'] / x['ppl']:.3g}× / {d:+.2f} ± {se:.2f}")
            out["cap_vs"].append({"method": m, "ratio": r, "ppl_ratio": cap["ppl"] / x["ppl"], "zs_diff_points": d, "zs_diff_se": se})
        md.append(f"| {m} | " + " | ".join(cols) + " |")
    md.append("")
    if a.protocol:
        md += ["## The same cells on the CPU (run_protocol.py) and in the grid\n", "| cell | CPU ppl | grid ppl | grid ÷ CPU | grid device |", "|---|---|---|---|---|"]
        for _, p in protocol:
            key = (p["method"], p["ratio"] if p["method"] != "dense" else None)
            g = by.get(key)
            if g is None or p.get("method_options") != g["options"]:
                continue  # the same method with the same options only
            name = f"{p['method']}" + ("" if key[1] is None else f" {key[1]:.0%}")
            md.append(f"| {name} | {fmt_ppl(p['perplexity']['value'])} | {fmt_ppl(g['ppl'])} | {g['ppl'] / p['perplexity']['value']:.4f} | {g['device']} |")
            out["device_agreement"].append({"cell": name, "cpu": p["perplexity"]["value"], "grid": g["ppl"]})
        md.append("")
    if a.peers:
        # capllm's own default-option CPU cell of the same method (the peer was scored on the CPU too)
        cpu_rows = {(p["method"], p["ratio"]): p["perplexity"]["value"] for stem, p in protocol if stem == f"{p['method']}-{p['ratio']:g}"}
        md += ["## llm-compressor side by side\n",
               "| method | ratio | llm-compressor ppl (CPU) | capllm ppl, CPU | capllm ÷ llm-compressor (CPU) | capllm ppl, grid | capllm cap (grid) ÷ llm-compressor "
               "| llm-compressor zero-shot mean (8) | capllm zero-shot mean (grid) |",
               "|---|---|---|---|---|---|---|---|---|"]
        for p in json.loads(Path(a.peers).read_text()):
            g, cap = by.get((p["method"], p["ratio"])), by.get(("cap", p["ratio"]))
            if g is None or cap is None:
                continue
            v, c = p["perplexity"]["value"], cpu_rows.get((p["method"], p["ratio"]))
            cpu = f"{c:.2f} | {c / v:.3f}" if c else "– | –"
            zf = Path(a.peer_zeroshot) / f"{p.get('tag')}.json" if a.peer_zeroshot else None
            pz = zs_scores(json.loads(zf.read_text())) if zf and zf.exists() else {}
            pzm = mean(x for x, _ in pz.values())
            pzs = f"{100 * pzm:.2f} ± {100 * se_of_mean(pz):.2f}" if pzm is not None else "–"
            md.append(f"| {p['method']} | {p['ratio']:.0%} | {v:.2f} | {cpu} | {g['ppl']:.2f} | {cap['ppl'] / v:.3f} | {pzs} | {100 * g['zs_mean']:.2f} ± {100 * g['zs_se']:.2f} |")
            out["peers"].append({"method": p["method"], "ratio": p["ratio"], "peer_ppl": v, "capllm_cpu_ppl": c, "capllm_grid_ppl": g["ppl"], "tool": p.get("tool"),
                                 "peer_zeroshot_mean": pzm, "capllm_zeroshot_mean": g["zs_mean"]})
        md.append("")
    (grid / "summary.md").write_text("\n".join(md))
    (grid / "summary.json").write_text(json.dumps(out, indent=1) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
