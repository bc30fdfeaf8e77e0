"""``report.md`` and plots from a benchmark grid's finished cells (and optional peer rows).

Per model: a quality table (perplexity, its ratio to dense, zero-shot mean and per task, the
long-form generation check) and a cost table (parameters kept, wall time per stage, peak memory,
bytes on disk when the cell saved its model), then "capllm vs peer" ratios when peer results
(``peers.json``: rows from ``benchmarks/peers/``) are given. Plots: perplexity (and zero-shot
mean) against the ratio per method, and the per-layer allocation of every cell whose result
carries one (``method_results.allocation``, written by CAP); cells without it are skipped.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

from capllm.eval.tasks import DEFAULT_TASKS
from capllm.grid.cells import load_cells

STAGES = ("compress", "eval", "zeroshot", "generation")


def _f(v, fmt="{:.2f}", none="–") -> str:
    return none if v is None else fmt.format(v)


def _ppl(r) -> float | None:
    return (r.get("perplexity") or {}).get("value")


def _zs(r, task=None) -> float | None:
    z = r.get("zeroshot")
    if not z:
        return None
    if task is None:
        return z.get("mean")
    t = z["tasks"].get(task)
    return None if t is None else t.get(t.get("primary_metric", "acc"))


def _bytes(r) -> str:
    s = r.get("storage")
    if not isinstance(s, dict):
        return "–"
    for key in ("bytes_on_disk", "total_bytes", "tensor_bytes", "bytes"):
        if isinstance(s.get(key), (int, float)):
            frac = s.get("decoder_fraction")
            return f"{s[key] / 2**20:.1f} MiB" + (f" (decoder {frac:.0%} of dense)" if isinstance(frac, (int, float)) else "")
    return "–"


def _label(r) -> tuple[str, str]:
    name = r["method"] + (f" {r['structure']}" if r.get("structure") else "")
    ratio = "–" if r["method"] == "dense" or r.get("ratio") in (None, 0) else f"{r['ratio']:.0%}"
    return name, ratio


def _sort_key(order: dict[str, int]):
    return lambda r: (order.get(r["method"], 99), r.get("ratio") or 0.0)


def quality_table(rows: list[dict], dense_ppl: float | None) -> str:
    tasks = [t for t in DEFAULT_TASKS if any(_zs(r, t) is not None for r in rows)]
    tasks += sorted({t for r in rows for t in (r.get("zeroshot") or {}).get("tasks", {}) if t not in tasks})
    gen = any(r.get("generation") for r in rows)
    head = ["method", "ratio", "ppl", "× dense"] + (["zero-shot mean"] + tasks if tasks else []) + (["gen ppl (dense judge)", "gen agreement"] if gen else [])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        p = _ppl(r)
        cells = [*_label(r), _f(p), _f(p / dense_ppl if p and dense_ppl else None, "{:.2f}×")]
        if tasks:
            cells += [_f(_zs(r), "{:.2%}")] + [_f(_zs(r, t), "{:.1%}") for t in tasks]
        if gen:
            g = r.get("generation") or {}
            cells += [_f(g.get("ppl_under_dense")), _f(g.get("agreement"), "{:.1%}")]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def cost_table(rows: list[dict]) -> str:
    head = ["method", "ratio", "kept decoder-linear params", "whole model", *[f"{s} (s)" for s in STAGES], "total (s)", "peak RSS compress (MiB)", "peak RSS (MiB)", "on disk"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        p, t = r["params"], r.get("time_s", {})
        kept = f"{p['kept_linear']:,} ({p['kept_linear'] / p['dense_linear']:.1%})" if p.get("dense_linear") else "–"
        cells = [*_label(r), kept, f"{p.get('whole_model_kept', 0):,}", *[_f(t.get(s), "{:.0f}") for s in STAGES], _f(t.get("total"), "{:.0f}"),
                 _f(r.get("peak_rss_mb_compress"), "{:.0f}"), _f(r.get("peak_rss_mb"), "{:.0f}"), _bytes(r)]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def peer_table(rows: list[dict], peers: list[dict], model: str) -> str:
    ours = {(r["method"], round(r.get("ratio") or 0, 4)): r for r in rows}
    out = ["| method | ratio | capllm ppl | peer | peer ppl | capllm / peer | capllm compress (s) | peer compress (s) |", "|---|---|---|---|---|---|---|---|"]
    n = 0
    for pr in peers:
        if pr.get("model") not in (model, None):
            continue
        r = ours.get((pr["method"], round(pr.get("ratio") or 0, 4)))
        mine, theirs = (_ppl(r) if r else None), _ppl(pr)
        out.append(f"| {pr['method']} | {pr.get('ratio', 0):.0%} | {_f(mine)} | {pr.get('tool', 'peer')} | {_f(theirs)} | "
                   f"{_f(mine / theirs if mine and theirs else None, '{:.3f}')} | {_f((r or {}).get('time_s', {}).get('compress'), '{:.0f}')} | "
                   f"{_f(pr.get('time_s', {}).get('compress'), '{:.0f}')} |")
        n += 1
    return "\n".join(out) if n else ""


def protocol_lines(rows: list[dict]) -> list[str]:
    lines = []
    r = next((x for x in rows if x.get("perplexity")), None)
    if r:
        p = r["perplexity"]
        lines.append(f"* perplexity: {p['dataset']}:{p['split']} ({p.get('origin', '?')}), {p['windows']} windows × {p['seqlen']} tokens ({p['tokens']:,} predicted)")
    c = next((x["calibration"] for x in rows if x.get("calibration")), None)
    if c:
        lines.append(f"* calibration: {c['dataset']} {c['nsamples']}×{c['seqlen']} tokens, seed {c['seed']}")
    z = next((x["zeroshot"] for x in rows if x.get("zeroshot")), None)
    if z:
        cfg = z["config"]
        srcs = sorted({t["source"] for t in z["tasks"].values()})
        docs = "all documents" if not cfg["limit"] else f"{cfg['limit']} documents per task (seeded subsample, seed {cfg['seed']})"
        lines.append(f"* zero-shot: lm-eval {z['lm_eval_version']}, {docs}, data {', '.join(srcs)}; mean = {z['mean_definition']}")
    g = next((x["generation"] for x in rows if x.get("generation")), None)
    if g:
        src = g.get("prompt_source") or {}
        lines.append(f"* generation check: {g['prompts']} prompts × {g['prompt_tokens']} tokens from {src.get('dataset', '?')}, {g['new_tokens']} greedy tokens each; "
                     "gen ppl = perplexity of the continuation under the dense model (dense's own greedy text: "
                     f"{g.get('ppl_under_dense_reference', float('nan')):.2f}); agreement = share of positions equal to the dense continuation")
    e = next((x.get("environment") for x in rows if x.get("environment")), None)
    if e:
        lines.append(f"* machine: {e.get('machine')}, {e.get('cpu_threads')} threads, {e.get('cuda_device') or 'no GPU'}; torch {e.get('torch')}, transformers {e.get('transformers')}")
    lines.append("* parameters counted: decoder-block linear layers (embeddings, norms and LM head are not compressed); whole-model counts beside them")
    return lines


def plot_ratio(rows: list[dict], dense_ppl: float | None, path: Path, title: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["method"] != "dense" and r.get("ratio") and _ppl(r):
            by_method[r["method"]].append(r)
    if not by_method:
        return None
    zs = any(_zs(r) is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if zs else 1, figsize=(12 if zs else 7, 4.2), squeeze=False)
    # one colour per method (tab20 has enough for the whole registry) and a marker cycle as well,
    # so no two lines look alike; the legend sits outside the axes, away from the data
    colors = plt.get_cmap("tab20").colors
    markers = "osD^v<>ph*X"
    style = {m: {"color": colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20], "marker": markers[i % len(markers)]}
             for i, m in enumerate(sorted(by_method))}
    ax = axes[0][0]
    for m, rs in sorted(by_method.items()):
        rs = sorted(rs, key=lambda r: r["ratio"])
        ax.plot([r["ratio"] * 100 for r in rs], [_ppl(r) for r in rs], label=m, **style[m])
    if dense_ppl:
        ax.axhline(dense_ppl, color="k", ls="--", lw=1, label="dense")
    ax.set_yscale("log")
    ax.set(xlabel="parameters removed from decoder linears (%)", ylabel="perplexity (log scale)", title=title)
    if zs:
        ax2 = axes[0][1]
        for m, rs in sorted(by_method.items()):
            rs = sorted((r for r in rs if _zs(r) is not None), key=lambda r: r["ratio"])
            ax2.plot([r["ratio"] * 100 for r in rs], [100 * _zs(r) for r in rs], label=m, **style[m])
        d = next((r for r in rows if r["method"] == "dense" and _zs(r) is not None), None)
        if d:
            ax2.axhline(100 * _zs(d), color="k", ls="--", lw=1, label="dense")
        ax2.set(xlabel="parameters removed from decoder linears (%)", ylabel="zero-shot mean accuracy (%)", title="zero-shot")
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def allocation_rows(r: dict) -> list[dict] | None:
    a = (r.get("method_results") or {}).get("allocation") or r.get("allocation")
    return a if isinstance(a, list) and a and isinstance(a[0], dict) and "name" in a[0] else None


def plot_allocation(r: dict, path: Path) -> Path | None:
    """Kept fraction of every matrix against its layer, one line per matrix kind (q/k/v/o/...)."""
    import re

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = allocation_rows(r)
    if rows is None:
        return None
    series: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for row in rows:
        m = re.search(r"\.(\d+)\.(?:.*\.)?([^.]+)$", row["name"])
        if not m:
            continue
        frac = row.get("kept_fraction")
        rank_share = None
        if row.get("rank_kept") is not None and row.get("kept_params"):
            mm, nn = row["shape"]
            rank_share = row["rank_kept"] * (mm + nn) / row["kept_params"]
        series[m.group(2)].append((int(m.group(1)), frac, rank_share))
    if not series:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, pts in sorted(series.items()):
        pts.sort()
        a1.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=kind)
        if any(p[2] is not None for p in pts):
            a2.plot([p[0] for p in pts], [p[2] or 0 for p in pts], marker=".", label=kind)
    a1.set(xlabel="layer", ylabel="kept fraction of the matrix", title=f"{r['method']} {r.get('ratio', 0):.0%}: per-layer allocation")
    a2.set(xlabel="layer", ylabel="share of kept params in low-rank factors", title="rank vs sparse")
    a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(root: str | Path, names: list[str] | None = None, peers: list[dict] | None = None) -> Path:
    """Write ``root/report.md`` (+ PNG plots) from the finished cells; returns the report path."""
    root = Path(root)
    rows = load_cells(root, names)
    if peers is None and (root / "peers.json").exists():
        peers = json.loads((root / "peers.json").read_text())
    order = {}
    for r in rows:
        order.setdefault(r["method"], len(order))
    by_model: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_model[r["model"]["name"]].append(r)
    md = [f"# Benchmark grid: {root.name}", "", f"Written {time.strftime('%Y-%m-%d %H:%M')} from {len(rows)} finished cell(s) under `{root}/cells/`."]
    bench = root / "bench.json"
    if bench.exists():
        cmds = json.loads(bench.read_text()).get("commands", {})
        if cmds:
            md.append(f"Each cell is one process; its exact command is in `bench.json`, e.g. `{next(iter(cmds.values()))}`.")
    md.append("")
    missing = [n for n in (names or []) if n not in {r["_cell"] for r in rows}]
    if missing:
        md += [f"Not finished (or failed; see `logs/`): {', '.join(missing)}", ""]
    for model, rs in by_model.items():
        rs.sort(key=_sort_key(order))
        dense = next((r for r in rs if r["method"] == "dense"), None)
        dense_ppl = _ppl(dense) if dense else next(((r.get("perplexity_dense") or {}).get("value") for r in rs if r.get("perplexity_dense")), None)
        md += [f"## {model}", "", "### Quality", "", quality_table(rs, dense_ppl), "", "### Cost", "", cost_table(rs), ""]
        if peers:
            pt = peer_table(rs, peers, model)
            if pt:
                md += ["### capllm vs peers (same model, calibration tokens and evaluator)", "", pt, ""]
        safe = model.replace("/", "_")
        img = plot_ratio(rs, dense_ppl, root / f"ppl_vs_ratio__{safe}.png", model)
        if img:
            md += [f"![perplexity vs ratio]({img.name})", ""]
        for r in rs:
            a = plot_allocation(r, root / f"allocation__{r['_cell']}.png")
            if a:
                md += [f"![allocation {r['_cell']}]({a.name})", ""]
        gens = [r for r in rs if (r.get("generation") or {}).get("examples")]
        if gens:
            md += ["### Generation sample (first prompt)", "", "Prompt: " + _quote(gens[0]["generation"]["examples"][0]["prompt"]), "",
                   "* dense: " + _quote(gens[0]["generation"]["examples"][0]["dense"])]
            md += [f"* {' '.join(_label(r))}: " + _quote(r["generation"]["examples"][0]["compressed"]) for r in gens if r["method"] != "dense"]
            md.append("")
        md += ["### Protocol", "", *protocol_lines(rs), ""]
    out = root / "report.md"
    out.write_text("\n".join(md))
    return out


def _quote(s: str, n: int = 400) -> str:
    s = " ".join(s.split())
    return "“" + (s[:n] + "…" if len(s) > n else s) + "”"
