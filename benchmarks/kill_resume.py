"""kill -9 a real CAP run at several points, resume it each time, compare with an uninterrupted run.

One ``capllm compress`` run (cold Stage 1 cache) is started; whenever its work directory shows
that it reached the next kill point, the process gets ``SIGKILL`` and the same command is started
again. Points (in the order a CAP run reaches them):

* ``statistics``  — the Stage 1 pass has finished ``--stats-block`` blocks;
* ``stage1_rpca`` — the robust-PCA cache holds a number of matrices that is not a whole block;
* ``fisher``      — the block-wise backward pass has a checkpoint;
* ``scores``      — ``--scores`` matrices have their score file;
* ``selection``   — the selection has written ``--keeps`` masks;
* ``refit``       — the refit pass has finished ``--refit-block`` blocks.

The final ``result.json`` numbers (perplexity, parameter counts, per-layer records, allocation)
are compared with a reference result of the same protocol (``--reference``, e.g. the ``cap`` cell
of ``run_protocol.py``); the comparison and every kill go to a JSON file.

    python benchmarks/kill_resume.py --reference benchmarks/results/scale/smollm2-135m/cap-0.5.json \\
        --out benchmarks/results/scale/kill-resume-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROTOCOL = ["--dataset", "wikitext2", "--eval-seqlen", "512", "--max-windows", "64", "--calib", "enwiki", "--nsamples", "32", "--seqlen", "512", "--seed", "0"]


def _count(pattern: Path) -> int:
    return len(list(pattern.parent.glob(pattern.name))) if pattern.parent.exists() else 0


def _done(state: Path) -> int:
    try:
        return int(json.loads(state.read_text())["done"]) + 1
    except (OSError, ValueError, KeyError):
        return 0


def _stage1_matrices(cache: Path) -> int:
    for man in (cache / "stage1").glob("*/manifest.json"):
        try:
            return len(json.loads(man.read_text())["matrices"])
        except (OSError, ValueError):
            return 0
    return 0


def points(a, work: Path, cache: Path) -> list[tuple[str, callable]]:
    cap, passes = work / "compress" / "cap", work / "compress" / "passes"
    return [
        ("statistics", lambda: _done(passes / "cap-stage1" / "state.json") >= a.stats_block),
        ("stage1_rpca", lambda: _stage1_matrices(cache) % 7 not in (0,) and _stage1_matrices(cache) > 7 * a.stats_block),
        ("fisher", lambda: (cap / "fisher-checkpoint.pt").exists()),
        ("scores", lambda: _count(cap / "scores" / "*.safetensors") >= a.scores),
        ("selection", lambda: _count(cap / "keep" / "*.safetensors") >= a.keeps),
        ("refit", lambda: _done(passes / "cap-refit" / "state.json") >= a.refit_block),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--reference", required=True, help="result JSON of an uninterrupted run of the same protocol")
    ap.add_argument("--out", required=True)
    ap.add_argument("--stats-block", type=int, default=5)
    ap.add_argument("--scores", type=int, default=60)
    ap.add_argument("--keeps", type=int, default=30)
    ap.add_argument("--refit-block", type=int, default=10)
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kill-resume-"))
    cache = root / "cache"  # a cold Stage 1 cache; the model checkpoint and dense figure are shared
    src = Path(os.environ.get("CAPLLM_CACHE") or Path.home() / ".cache" / "capllm")
    (cache / "models").mkdir(parents=True)
    os.symlink(src / "models" / a.model, cache / "models" / a.model)
    if (src / "dense-perplexity.json").exists():
        shutil.copy(src / "dense-perplexity.json", cache / "dense-perplexity.json")
    out = root / "run"
    work = out.with_name(out.name + ".work")
    cmd = ["capllm", "compress", "--model", a.model, "--method", "cap", "--ratio", "0.5", "--out", str(out), "--quiet", "--save", "none", *PROTOCOL]
    env = {**os.environ, "CAPLLM_CACHE": str(cache)}
    todo = points(a, work, cache)
    kills, t0 = [], time.time()
    while True:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        killed = None
        while proc.poll() is None:
            if todo and todo[0][1]():
                name, _ = todo.pop(0)
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                killed = name
                kills.append({"point": name, "at_s": round(time.time() - t0, 1)})
                print(f"[kill -9] {name} at {time.time() - t0:.0f} s; resuming", file=sys.stderr, flush=True)
                break
            time.sleep(0.5)
        if killed:
            continue
        if proc.returncode != 0:
            raise SystemExit(f"the run failed ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        break
    got = json.loads((out / "result.json").read_text())
    ref = json.loads(Path(a.reference).read_text())
    keys = ("params", "layers")
    same = {k: got[k] == ref[k] for k in keys}
    same["perplexity"] = got["perplexity"]["mean_nll"] == ref["perplexity"]["mean_nll"]
    same["allocation"] = got["method_results"]["allocation"] == ref["method_results"]["allocation"]
    report = {"command": shlex.join(cmd), "kills": kills, "missed_points": [n for n, _ in todo], "attempts": got.get("attempts"),
              "identical": same, "perplexity": got["perplexity"]["value"], "reference_perplexity": ref["perplexity"]["value"],
              "time_s": got["time_s"], "peak_rss_mb": got["peak_rss_mb"], "wall_s": round(time.time() - t0, 1), "date": time.strftime("%Y-%m-%d")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("kills", "missed_points", "identical", "perplexity", "reference_perplexity")}, indent=1))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
