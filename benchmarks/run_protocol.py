"""Run methods under the shared SmolLM2-135M protocol and tabulate them side by side.

Each (method, ratio) cell runs as its own ``capllm compress`` process (so peak memory is that
cell's own), writes its result.json under ``benchmarks/results/<model>/<method>-<ratio>.json``
with the exact command recorded, and a finished cell is not recomputed unless ``--force``.
The table (markdown and JSON) lists perplexity, the ratio to dense, kept parameters, wall time
per stage and peak memory.

    python benchmarks/run_protocol.py --methods dense,magnitude,wanda,sparsegpt --ratios 0.5 \
        --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

PROTOCOL = {  # BENCHMARKS.md protocol (DESIGN §7)
    "--dataset": "wikitext2", "--eval-seqlen": "512", "--max-windows": "64",
    "--calib": "enwiki", "--nsamples": "32", "--seqlen": "512", "--seed": "0",
}


def cell_command(model: str, method: str, ratio: float, out: Path, data_dir: str, extra: list[str]) -> list[str]:
    cmd = ["capllm", "compress", "--model", model, "--method", method, "--out", str(out), "--data-dir", data_dir, "--quiet", "--save", "none"]
    if method != "dense":
        cmd += ["--ratio", f"{ratio:g}"]
    for k, v in PROTOCOL.items():
        cmd += [k, v]
    return cmd + extra


def run_cell(model, method, ratio, data_dir, extra, results_dir: Path, force: bool) -> dict:
    tag = method if method == "dense" else f"{method}-{ratio:g}"
    if extra:
        tag += "-" + "-".join(x.replace("--option", "").replace("=", "").strip("-") for x in extra if x != "--option")
    tag = tag.replace("/", "_").replace(" ", "")  # a path-valued option must not make directories
    dest = results_dir / f"{tag}.json"
    if dest.exists() and not force:
        print(f"[skip] {tag}: {dest} exists", file=sys.stderr)
        return json.loads(dest.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = cell_command(model, method, ratio, out, data_dir, extra)
        print(f"[run] {shlex.join(cmd)}", file=sys.stderr, flush=True)
        t0 = time.time()
        lock = os.environ.get("CAPLLM_HEAVY_LOCK")  # one heavy job at a time on a shared machine
        proc = subprocess.run((["flock", lock] if lock else []) + cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{tag} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        res = json.loads((out / "result.json").read_text())
    res["command"] = shlex.join(c if c != str(out) else "runs/<out>" for c in cmd)
    res["process_wall_s"] = round(time.time() - t0, 1)
    res["date"] = time.strftime("%Y-%m-%d")
    res.pop("out_dir", None)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(res, indent=2) + "\n")
    return res


def table(rows: list[dict]) -> str:
    """One row per cell; ``ppl / dense`` uses the dense run of the same protocol (or the cell's own dense score)."""
    dense = next((r["perplexity"]["value"] for r in rows if r["method"] == "dense"), None)
    out = ["| cell | method | ratio | ppl | ppl / dense | kept linear params | compress time (s) | total wall (s) | peak RSS (MiB) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ppl = r["perplexity"]["value"]
        p = r["params"]
        ref = dense or (r.get("perplexity_dense") or {}).get("value")
        rel = f"{ppl / ref:.2f}×" if ref else "–"
        ratio = "–" if r["method"] == "dense" else f"{r['ratio']:.0%}"
        name = r["method"] + (f" {r['structure']}" if r.get("structure") else "")
        out.append(f"| {r.get('cell', name)} | {name} | {ratio} | {ppl:.2f} | {rel} | {p['kept_linear']:,} / {p['dense_linear']:,} | "
                   f"{r['time_s'].get('compress', 0):.0f} | {r['time_s']['total']:.0f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(out)


def all_cells(results_dir: Path) -> list[dict]:
    """Every finished protocol cell in ``results_dir`` (dense first, then by ratio and perplexity)."""
    rows = []
    for f in sorted(results_dir.glob("*.json")):
        r = json.loads(f.read_text())
        if isinstance(r, dict) and isinstance(r.get("perplexity"), dict) and "params" in r:
            rows.append({**r, "cell": f.stem})
    return sorted(rows, key=lambda r: (r["method"] != "dense", r.get("ratio", 0), r["perplexity"]["value"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="dense,magnitude,wanda,sparsegpt")
    ap.add_argument("--ratios", default="0.5")
    ap.add_argument("--data-dir", default=os.environ.get("CAPLLM_DATA_DIR", "../shared/data"))
    ap.add_argument("--extra", default="", help="extra flags passed to every cell, e.g. \"--option iters=10\"")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--table", default=None, help="write the markdown table here (default: results/<model>/table.md)")
    ap.add_argument("--results-dir", default=None, help="cell JSONs go here (default benchmarks/results/<model>)")
    a = ap.parse_args()
    results_dir = Path(a.results_dir) if a.results_dir else HERE / "results" / a.model
    extra = shlex.split(a.extra)
    rows = []
    for method in a.methods.split(","):
        for ratio in ([0.0] if method == "dense" else [float(r) for r in a.ratios.split(",")]):
            rows.append(run_cell(a.model, method, ratio, a.data_dir, extra, results_dir, a.force))
    print(table(rows))
    md = table(all_cells(results_dir))  # the saved table lists every finished cell, not only this run's
    (Path(a.table) if a.table else results_dir / "table.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
