"""Peak memory of real-model cells against their checkpoint size: a table and a plot.

Reads ``capllm compress`` result JSONs (cells of ``run_protocol.py`` or ``capllm bench``), takes
each model's checkpoint size on disk from the alias checkpoint in ``$CAPLLM_CACHE/models/`` (or
``--checkpoint-bytes MODEL=BYTES``), and writes a markdown table (model, method, perplexity,
peak RSS, checkpoint, RSS − checkpoint, the limit ``checkpoint + 2 GiB``, compress time and its
stages) and ``peak_rss_vs_checkpoint_real.png`` with the line ``y = x + 2 GiB``.

    python benchmarks/scale_real.py benchmarks/results/scale/smollm2-135m/*.json \\
        benchmarks/results/scale/qwen2.5-coder-1.5b/*.json --out benchmarks/results/scale
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

GIB, MIB = 2**30, 2**20


def checkpoint_bytes(model: str, given: dict[str, int]) -> int | None:
    if model in given:
        return given[model]
    root = Path(os.environ.get("CAPLLM_CACHE") or Path.home() / ".cache" / "capllm") / "models" / model
    files = list(root.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


def stages(r: dict) -> str:
    t = r.get("time_s", {})
    keys = [k for k in ("stage1", "stage1_rpca", "fisher", "stage2_scores", "stage2_final", "refit", "capture") if k in t]
    if not keys and "compress" in t:
        return f"compress {t['compress']:.0f}"
    return ", ".join(f"{k} {t[k]:.0f}" for k in keys)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cells", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--checkpoint-bytes", action="append", default=[], metavar="MODEL=BYTES")
    a = ap.parse_args()
    given = {k: int(v) for k, v in (x.split("=") for x in a.checkpoint_bytes)}
    rows = []
    for f in a.cells:
        r = json.loads(Path(f).read_text())
        model = r["model"]["name"]
        ck = checkpoint_bytes(model, given)
        rows.append({"file": f, "model": model, "method": r["method"], "ratio": r.get("ratio"), "ppl": (r.get("perplexity") or {}).get("value"),
                     "peak_rss_mb": r["peak_rss_mb"], "checkpoint_mb": None if ck is None else ck / MIB,
                     "compress_s": r.get("time_s", {}).get("compress"), "total_s": r.get("time_s", {}).get("total"), "stages": stages(r),
                     "peak_by_stage": r.get("peak_by_stage"), "attempts": r.get("attempts", 1), "commit_note": r.get("command", "")})
    rows.sort(key=lambda x: (x["checkpoint_mb"] or 0, x["method"]))
    lines = ["| model | method | ppl | peak RSS MiB | checkpoint MiB | RSS − checkpoint MiB | limit (ckpt + 2 GiB) | compress s (stages) | total s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        ck = x["checkpoint_mb"]
        over = "–" if ck is None else f"{x['peak_rss_mb'] - ck:,.0f}"
        limit = "–" if ck is None else ("✓ " if x["peak_rss_mb"] <= ck + 2048 else "✗ ") + f"{ck + 2048:,.0f}"
        comp = "–" if x["compress_s"] is None else f"{x['compress_s']:,.0f} ({x['stages']})"
        ppl = "–" if x["ppl"] is None else f"{x['ppl']:.2f}"
        lines.append(f"| {x['model']} | {x['method']} | {ppl} | {x['peak_rss_mb']:,.0f} | {'–' if ck is None else f'{ck:,.0f}'} | {over} | {limit} | {comp} | {x['total_s'] or 0:,.0f} |")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "real.md").write_text("\n".join(lines) + "\n")
    (out / "real.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))
    pts = [x for x in rows if x["checkpoint_mb"]]
    if pts:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4.5))
        for m in sorted({x["method"] for x in pts}):
            sel = [x for x in pts if x["method"] == m]
            ax.scatter([x["checkpoint_mb"] / 1024 for x in sel], [x["peak_rss_mb"] / 1024 for x in sel], label=m, s=40)
        xmax = max(x["checkpoint_mb"] for x in pts) / 1024 * 1.1
        ax.plot([0, xmax], [2, xmax + 2], "k--", lw=1, label="checkpoint + 2 GiB")
        ax.plot([0, xmax], [0, xmax], "k:", lw=1, label="checkpoint")
        ax.set(xlabel="checkpoint on disk (GiB)", ylabel="peak RSS (GiB)", title="capllm compress: peak host memory vs model size")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "peak_rss_vs_checkpoint_real.png", dpi=120)
        plt.close(fig)


if __name__ == "__main__":
    main()
