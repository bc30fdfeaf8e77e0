"""One compression on 1 and on N processes, side by side: wall time per stage, peak RSS per rank.

Each run is ``capllm compress`` (N > 1: under ``torchrun --standalone --nproc-per-node N``) with
one intra-op thread per rank (``OMP_NUM_THREADS=1``), so on a CPU the comparison is one core
against N cores; the speed-up is reported as a ratio from the same invocation. The result
figures must agree (the tests check masks and values; here the perplexities are listed).

    python benchmarks/distributed.py --model smollm2-135m --method sparsegpt --ranks 1,2 \\
        --out benchmarks/results/distributed/smollm2-135m-sparsegpt.json
    python benchmarks/distributed.py --model smollm2-135m --method cap --ranks 1,2 \\
        --out benchmarks/results/distributed/smollm2-135m-cap.json -- --option tune_epochs=0

(CAP's Stage 1 goes to a fresh folder per run, so each run computes it and the 2-rank run divides
it; ``tune_epochs=0`` leaves out block tuning, CAP's default since issue 13, to keep the pair
under an hour on this CPU.)

On a multi-GPU node the same compression is (one GPU per rank, NCCL):

    torchrun --standalone --nproc-per-node 8 -m capllm compress --model MODEL --method sparsegpt --ratio 0.5 --device cuda

Timings on a shared machine are upper bounds.

The best speed-up the division of each block's matrices allows (every matrix's cost from
``svd_cost`` / ``solve_cost``, nothing else counted), round robin against the cost-balanced
``Dist.owners``, without running a compression:

    python benchmarks/distributed.py --plan --model smollm2-135m --ranks 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROTOCOL = ["--dataset", "wikitext2", "--eval-seqlen", "512", "--max-windows", "64", "--calib", "enwiki", "--nsamples", "32", "--seqlen", "512", "--seed", "0"]


def run(model: str, method: str, ratio: str, ranks: int, out: Path, extra: list[str]) -> dict:
    # CAP's Stage 1 into a fresh folder per run, so both runs compute (and divide) it, not read a cache
    stage1 = ["--option", f"stage1_dir={out}.stage1"] if method.startswith("cap") and not any("stage1_dir" in x for x in extra) else []
    cmd = ["-m", "capllm", "compress", "--model", model, "--method", method, "--ratio", ratio, "--out", str(out), "--quiet", "--save", "none",
           "--device", "cpu", "--no-dense-cache", *PROTOCOL, *stage1, *extra]
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] if ranks > 1 else []) + cmd
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    load_before = os.getloadavg()
    t0 = time.time()
    proc = subprocess.run(launch, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{ranks} rank(s) failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    res = json.loads((out / "result.json").read_text())
    return {"ranks": ranks, "command": shlex.join(launch), "wall_s": round(wall, 1), "time_s": res["time_s"],
            "peak_rss_mb_by_rank": res.get("peak_rss_mb_by_rank", [res["peak_rss_mb"]]), "perplexity": res["perplexity"]["value"],
            "perplexity_dense": res["perplexity_dense"]["value"], "distributed": res.get("distributed"),
            # the machine's 1-minute load average before and after: how quiet "quiet" was
            "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]}


def plan(model: str, ranks: int) -> dict:
    """Σ_blocks total cost ÷ Σ_blocks (the busiest rank's cost), for each cost model and split."""
    from capllm.engine.distributed import Dist, solve_cost, svd_cost
    from capllm.models.layers import find_linears
    from capllm.models.loader import load_model

    handles = find_linears(load_model(model)[0])  # the checkpoint's own dtype: only the shapes are read
    blocks: dict[int, list] = {}
    for h in handles:
        blocks.setdefault(h.block_index, []).append(h.shape)
    dist = Dist(rank=0, world=ranks)
    out = {"model": model, "ranks": ranks, "blocks": len(blocks)}
    for what, cost in (("stage1_svd", svd_cost), ("layerwise_solve", solve_cost)):
        total, busiest = 0.0, {"round_robin": 0.0, "cost_balanced": 0.0}
        for shapes in blocks.values():
            c = [cost(s) for s in shapes]
            for split, owners in (("round_robin", [j % ranks for j in range(len(c))]), ("cost_balanced", dist.owners(c))):
                load = [0.0] * ranks
                for j, x in enumerate(c):
                    load[owners[j]] += x
                busiest[split] += max(load)
            total += sum(c)
        out[what] = {split: round(total / b, 3) for split, b in busiest.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="sparsegpt")
    ap.add_argument("--ratio", default="0.5")
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--out")
    ap.add_argument("--plan", action="store_true", help="print the best speed-up each split of the blocks allows, and stop")
    ap.add_argument("extra", nargs="*", help="after --: more capllm compress arguments")
    a = ap.parse_args()
    if a.plan:
        for n in (int(x) for x in a.ranks.split(",") if int(x) > 1):
            print(json.dumps(plan(a.model, n)))
        return
    if not a.out:
        ap.error("--out is required (except with --plan)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in a.ranks.split(",")):
            rows.append(run(a.model, a.method, a.ratio, n, Path(tmp) / f"n{n}", a.extra))
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    for r in rows:
        r["speedup_total"] = round(base["time_s"]["total"] / r["time_s"]["total"], 2)
        r["speedup_compress"] = round(base["time_s"]["compress"] / r["time_s"]["compress"], 2)
    out = {"what": "one compression on 1 and N processes (one thread each)", "model": a.model, "method": a.method, "ratio": a.ratio,
           "protocol": PROTOCOL, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
           "note": "wall times on a shared machine are upper bounds", "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    stages = [k for k in base["time_s"] if k != "total"]
    md = ["| ranks | " + " | ".join(stages) + " | total s | speed-up (total / compress) | peak RSS MiB per rank | ppl | load avg before, after |", "|---" * (len(stages) + 6) + "|"]
    for r in rows:
        md.append(f"| {r['ranks']} | " + " | ".join(f"{r['time_s'].get(k, 0):.0f}" for k in stages) +
                  f" | {r['time_s']['total']:.0f} | {r['speedup_total']}× / {r['speedup_compress']}× | {', '.join(f'{x:,.0f}' for x in r['peak_rss_mb_by_rank'])} | {r['perplexity']:.3f} | {', '.join(map(str, r.get('load_average_before_after', [])))} |")
    Path(a.out).with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
