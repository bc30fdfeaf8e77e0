"""CAP quality (issue 13): an ablation table from ``capllm compress`` result JSONs.

Each row is one cell: model, method, the options that differ from the method's defaults,
perplexity, its ratio to the reference method's cell of the same model, ratio and protocol
(``--reference``, default ``sparsegpt``), compression time, the share of the budget spent on
singular directions (``Σ r (m + n) / kept``), for CAP what the allocation safety did (the
guard's held-out losses and choice, the per-block calibration factors), and what block tuning
did (``tune_epochs``: the held-out block-output error it removed). Cells of different
protocols (dataset, windows, seqlen, calibration, N:M structure) are never compared: the reference must match.

    python benchmarks/quality.py benchmarks/results/quality/*/*.json --out benchmarks/results/quality
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path


def defaults(method: str) -> dict:
    from capllm.methods.base import get_method

    opts = get_method(method).Options
    return {f.name: f.default for f in fields(opts)} if opts is not None else {}


def get_options(method: str):
    from capllm.methods.base import get_method

    return get_method(method).Options()


def protocol(r: dict) -> tuple:
    p, c = r.get("perplexity") or {}, r.get("calibration") or {}
    return (r["model"]["name"], r.get("ratio"), p.get("dataset"), p.get("split"), p.get("seqlen"), p.get("windows"),
            c.get("dataset"), c.get("nsamples"), c.get("seqlen"), c.get("seed"), r.get("structure"))


# how a run behaved before these options were recorded: no guard, no block tuning
BEFORE_THE_OPTION = {"guard": "none", "tune_epochs": 0}


def changed(r: dict) -> str:
    try:
        base = defaults(r["method"])
    except Exception:  # a method this checkout does not know
        base = {}
    if r.get("structure") and r["method"] in ("cap", "cap-uniform") and "refit" in base:  # the refit CAP defaults to with N:M
        from capllm.methods.cap import _structured_defaults

        base["refit"] = _structured_defaults(get_options(r["method"]), frozenset(), r["structure"]).refit
    opts = dict(r.get("method_options") or {})
    for k, v in BEFORE_THE_OPTION.items():  # a cell from before the option existed ran as its old behaviour
        if k in base and k not in opts:
            opts[k] = v
    diff = {k: v for k, v in opts.items() if k in base and base[k] != v and k != "stage1_dir"}
    if ((r.get("method_results") or {}).get("block_tune") or {}).get("skipped"):  # the run said it did not tune
        opts["tune_epochs"] = 0
        diff = {k: v for k, v in diff.items() if not k.startswith("tune_")}
    if not opts.get("tune_epochs"):  # block tuning off: its other options did nothing
        diff = {k: v for k, v in diff.items() if not k.startswith("tune_") or k == "tune_epochs"}
    from capllm.methods.cap import GUARD_AUTO

    g = (r.get("method_results") or {}).get("guard") or {}
    if opts.get("guard") == "auto" and g.get("against") is not None:  # what auto meant when the cell ran
        ran = "+".join(g["against"])
        if ran != GUARD_AUTO:
            diff["guard"] = f"{ran} (auto then)"
    elif opts.get("guard") == GUARD_AUTO:  # spelled out: what auto is today
        diff.pop("guard", None)
    if r["method"] == "cap-uniform":  # it has no allocation to guard
        diff.pop("guard", None)
    return ", ".join(f"{k}={v}" for k, v in sorted(diff.items())) or "defaults"


def lowrank_share(r: dict) -> float | None:
    mr = r.get("method_results") or {}
    alloc = mr.get("allocation")
    if not alloc:
        return None
    kept = sum(a["kept_params"] for a in alloc)
    return sum(a["rank_kept"] * (a["shape"][0] + a["shape"][1]) for a in alloc) / kept if kept else 0.0


def safety(r: dict) -> str:
    mr = r.get("method_results") or {}
    out = []
    if (g := mr.get("guard")) is not None:
        losses = g.get("losses") or {k[5:]: v for k, v in g.items() if k.startswith("loss_")}
        out.append("guard " + " / ".join(f"{k} {v:.3f}" for k, v in losses.items()) + f" → {g['chosen']}")
    if (c := mr.get("calibration")) is not None:
        f = [c["factors"][b] for b in sorted(c["factors"], key=int)]
        out.append(f"calibration factors {min(f):.2g}–{max(f):.2g} (first {f[0]:.2g}, last {f[-1]:.2g})")
    return "; ".join(out)


def tuning(r: dict) -> str:
    """Block tuning's effect, from each block's record: the mean relative drop of the held-out
    block-output error, and how many blocks kept epoch 0 (no change)."""
    recs = [x["block_tune"] for x in r.get("layers") or [] if isinstance(x.get("block_tune"), dict)]
    if not recs:
        return ""
    drops = [1 - b["held_out_after"] / b["held_out_before"] for b in recs if b["held_out_before"] > 0]
    kept0 = sum(b["kept_epoch"] == 0 for b in recs)
    backed = [len(b.get("backoff_after") or []) for b in recs]
    backoff = f"; backed off {min(backed)}–{max(backed)} times per block" if any(backed) else ""
    return f"held-out block error −{100 * sum(drops) / len(drops):.1f} % (mean of {len(recs)} blocks; {kept0} unchanged{backoff})"


def reselection(r: dict) -> str:
    """``refit=reselect``: the share of each matrix's kept sparse entries the OBS pass moved,
    weighted by the matrix's kept count (from the layer records)."""
    recs = [(x["support_moved"], x.get("nnz") or 0) for x in r.get("layers") or [] if "support_moved" in x]
    total = sum(n for _, n in recs)
    if not recs or not total:
        return ""
    return f"support re-chosen: {100 * sum(m * n for m, n in recs) / total:.1f} % of the kept entries moved"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--reference", default="sparsegpt", help="method whose cell of the same protocol is the 1.00 of the ratio column")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    cells = [json.loads(p.read_text()) | {"_file": str(p)} for p in a.results]
    ppl_of = lambda r: (r.get("perplexity") or {}).get("value")  # None: a cell run with --no-eval (e.g. for its guard record)
    ref = {protocol(r): ppl_of(r) for r in cells if r["method"] == a.reference and changed(r) == "defaults" and ppl_of(r) is not None}
    rows = []
    for r in sorted(cells, key=lambda r: (r["model"]["name"], r.get("ratio") or 0, r.get("structure") or "", r["method"], changed(r))):
        ppl = ppl_of(r)
        base = ref.get(protocol(r))
        rows.append({"model": r["model"]["name"], "method": r["method"], "ratio": r.get("ratio"), "structure": r.get("structure"), "options": changed(r), "perplexity": ppl,
                     f"vs_{a.reference}": None if base is None or ppl is None else ppl / base, "compress_s": (r.get("time_s") or {}).get("compress"),
                     "lowrank_share": lowrank_share(r), "safety": safety(r), "tuning": tuning(r), "refit": reselection(r), "peak_rss_mb": r.get("peak_rss_mb"),
                     "capllm_commit": (r.get("environment") or {}).get("capllm_commit"), "date": r.get("date"), "file": r["_file"],
                     "protocol": dict(zip(("model", "ratio", "dataset", "split", "seqlen", "windows", "calib", "nsamples", "calib_seqlen", "seed", "structure"), protocol(r)))})
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "quality.json").write_text(json.dumps(rows, indent=1))
    lines = [f"| model | method | ratio | calibration | options | perplexity | ÷ {a.reference} | compress s | low-rank share | allocation safety | refit / block tuning |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        vs, lr, t = x[f"vs_{a.reference}"], x["lowrank_share"], x["compress_s"]
        vs_s = "" if vs is None else f"{vs:.3f}"
        t_s = "" if t is None else f"{t:.0f}"
        lr_s = "" if lr is None else f"{100 * lr:.2f} %"
        ppl_s = "–" if x["perplexity"] is None else f"{x['perplexity']:.2f}"
        ratio = f"{x['ratio']} ({x['structure']})" if x["structure"] else f"{x['ratio']}"
        p = x["protocol"]
        calib = f"{p['calib']} {p['nsamples']} × {p['calib_seqlen']}" if p.get("nsamples") else "–"
        lines.append(f"| {x['model']} | {x['method']} | {ratio} | {calib} | {x['options']} | {ppl_s} | {vs_s} | {t_s} | {lr_s} | {x['safety']} | {'; '.join(t for t in (x['refit'], x['tuning']) if t)} |")
    (a.out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
