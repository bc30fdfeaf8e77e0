"""Stage 1's partial step with and without the Gram operator, side by side on real matrices.

For each matrix: CAP's robust PCA (activation-aware scales from a CAP work directory's Stage 1
statistics, λ scale 0.5, tol 1e-7) once with the explicit float64 Gram in every step and once
with the default rule (``XᵀX`` applied as an operator where :func:`capllm.decompose.svt.
operator_pays`), in one process, one thread (how Stage 1's workers run). Writes JSON + a table:
seconds, iterations, rank, kinds of steps, and the difference of the two results.

    python benchmarks/rpca_operator.py --model ~/.cache/capllm/models/qwen2.5-coder-1.5b \\
        --stats RUN.work/compress/cap/stats/block_0001.safetensors --block 1 \\
        --out benchmarks/results/rpca/operator-qwen2.5-1.5b.json

Timings on a shared machine are upper bounds; the ratio is what to read.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import time
from pathlib import Path

import torch
from safetensors import safe_open

from capllm.decompose import RPCAConfig, rpca_batched, svt


def _weight(model_dir: Path, name: str) -> torch.Tensor:
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as s:
            if name in s.keys():
                return s.get_tensor(name).float()
    raise SystemExit(f"{name} not found in {model_dir}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model directory with .safetensors")
    ap.add_argument("--stats", required=True, help="a CAP Stage 1 statistics file (…/compress/cap/stats/block_XXXX.safetensors)")
    ap.add_argument("--block", type=int, required=True)
    ap.add_argument("--linears", default="mlp.gate_proj,mlp.down_proj,self_attn.q_proj")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    cfg = RPCAConfig(lam_scale=0.5, tol=1e-7)
    rows = []
    with safe_open(a.stats, framework="pt") as st:
        for lin in a.linears.split(","):
            name = f"model.layers.{a.block}.{lin}"
            W = _weight(Path(a.model).expanduser(), name + ".weight")
            d = st.get_tensor(name + ".adiag").clamp_min(0).sqrt()
            runs = {}
            for kernel, min_numel in (("gram", float("inf")), ("auto", svt.OPERATOR_MIN_NUMEL)):
                saved = svt.OPERATOR_MIN_NUMEL
                svt.OPERATOR_MIN_NUMEL = min_numel
                try:
                    t0 = time.perf_counter()
                    r = rpca_batched(W[None], col_scale=d[None], config=cfg)[0]
                    runs[kernel] = (r, time.perf_counter() - t0)
                finally:
                    svt.OPERATOR_MIN_NUMEL = saved
            (g, tg), (o, to) = runs["gram"], runs["auto"]
            rel = lambda x, y: float((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30))
            row = {"matrix": name, "shape": list(W.shape), "gram_s": round(tg, 1), "auto_s": round(to, 1), "speedup": round(tg / to, 2),
                   "iterations": [g.iterations, o.iterations], "rank": [g.rank, o.rank],
                   "steps_auto": dict(collections.Counter(h["svd"] for h in o.history)),
                   "rel_diff_L": rel(o.L(), g.L()), "rel_diff_S": rel(o.S, g.S), "support_equal_fraction": float((o.S != 0).eq(g.S != 0).float().mean())}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {"what": "Stage 1 robust PCA: explicit Gram vs Gram operator (default rule)", "model": a.model, "block": a.block,
           "rpca": cfg.to_dict(), "threads": 1, "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
           "note": "timings on a shared machine are upper bounds", "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    md = ["| matrix | shape | Gram s | auto s | speed-up | iterations | rank | ‖ΔL‖/‖L‖ | ‖ΔS‖/‖S‖ |", "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['matrix']} | {r['shape'][0]}×{r['shape'][1]} | {r['gram_s']} | {r['auto_s']} | {r['speedup']}× | {r['iterations'][0]} / {r['iterations'][1]} | {r['rank'][0]} / {r['rank'][1]} | {r['rel_diff_L']:.1e} | {r['rel_diff_S']:.1e} |" for r in rows]
    Path(a.out).with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
