"""llm-compressor's Wanda and SparseGPT next to capllm's, on the same model, tokens and evaluator.

    python benchmarks/peers/run_peers.py --model smollm2-135m --methods wanda,sparsegpt --sparsity 0.5 \
        --data-dir ../shared/data --lock /work/locks/heavy.lock

1. creates its own virtual environment (``--venv``, default ``/work/peers-venv``; outside the
   repository) on first use and installs ``llmcompressor==0.14.0.1`` there with the same torch
   version as capllm's environment (llm-compressor pins its own transformers);
2. exports capllm's calibration windows (``enwiki`` 32×512, seed 0 — exactly the tokens
   ``capllm compress`` calibrates on) to ``OUT/calib.json``;
3. runs ``llmc_worker.py`` inside that environment for each method (one-shot Wanda /
   SparseGPT: unstructured, sparsity 0.5, block 128, dampening 0.01, every decoder-block
   linear, LM head dense) on the plain HF checkpoint of the model, saving each pruned model
   under ``OUT/llm-compressor-<method>-<sparsity>/``;
4. scores each saved model with capllm's evaluator (WikiText-2 raw test, seqlen 512, first 64
   windows) and measures the sparsity it actually has;
5. writes ``benchmarks/results/peers/<model>.json`` (one row per peer run, the format
   ``capllm bench --peers`` reads) and a markdown table with the capllm rows from
   ``benchmarks/results/<model>/<method>-<sparsity>.json`` beside them and the ratio.

Finished steps are skipped on a rerun (``--force`` redoes them). With ``--lock FILE`` the heavy
steps (pruning, evaluation) hold that lock file.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
LLMC = "llmcompressor==0.14.0.1"


def ensure_venv(venv: Path, log) -> Path:
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import llmcompressor"], capture_output=True).returncode == 0:
        return py
    import torch

    torch_req = "torch==" + torch.__version__.split("+")[0]
    log(f"[venv] creating {venv} with {LLMC} and {torch_req}")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", torch_req, LLMC], check=True)
    return py


def export_calibration(model_dir: Path, args, path: Path) -> dict:
    from transformers import AutoTokenizer

    from capllm.data.calibration import CalibrationConfig, load_calibration

    tok = AutoTokenizer.from_pretrained(model_dir)
    calib = load_calibration(tok, CalibrationConfig(args.calib, args.nsamples, args.seqlen, args.seed, args.data_dir))
    desc = calib.describe()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"describe": desc, "input_ids": calib.windows.tolist()}))
    return desc


def decoder_sparsity(model) -> float:
    from capllm.models.layers import find_linears

    zeros = total = 0
    for h in find_linears(model):
        w = h.weight()
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total


def lock(path: str | None):
    if not path:
        return nullcontext()
    from capllm.grid.run import file_lock

    return file_lock(Path(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--data-dir", default=os.environ.get("CAPLLM_DATA_DIR", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--calib", default="enwiki")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=64)
    ap.add_argument("--venv", default="/work/peers-venv")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "peers"))
    ap.add_argument("--lock", default=None, help="hold this lock file during the heavy steps (e.g. /work/locks/heavy.lock)")
    ap.add_argument("--capllm-results", default=None, help="capllm's protocol results to compare with (default benchmarks/results/<model>/)")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    import torch

    torch.set_num_threads(2)
    from capllm.eval.perplexity import PerplexityConfig, evaluate_perplexity
    from capllm.models.loader import ensure_alias_checkpoint, load_model

    py = ensure_venv(Path(a.venv), log)
    model_dir = ensure_alias_checkpoint(a.model) if not Path(a.model).is_dir() else Path(a.model)
    out = Path(a.out) / Path(a.model).name
    calib_path = out / "calib.json"
    calib = export_calibration(model_dir, a, calib_path)
    log(f"[calib] {calib['dataset']} {calib['nsamples']}×{calib['seqlen']} seed {calib['seed']} → {calib_path}")
    results_dir = REPO / "benchmarks" / "results" / "peers"
    rows_path = results_dir / f"{Path(a.model).name}.json"
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else []
    for method in [m.strip() for m in a.methods.split(",") if m.strip()]:
        tag = f"llm-compressor-{method}-{a.sparsity:g}"
        dest = out / tag
        if a.force and dest.exists():
            shutil.rmtree(dest)
        if not (dest / "peer_run.json").exists():
            tmp = out / f".{tag}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            cmd = [str(py), str(HERE / "llmc_worker.py"), "--model", str(model_dir), "--calib", str(calib_path), "--method", method,
                   "--sparsity", str(a.sparsity), "--out", str(tmp)]
            log(f"[prune] {shlex.join(cmd)}")
            with lock(a.lock):
                subprocess.run(cmd, check=True)
            os.replace(tmp, dest)
        run = json.loads((dest / "peer_run.json").read_text())
        if a.force or not any(r.get("tag") == tag and r.get("calibration") == calib for r in rows):
            with lock(a.lock):
                model, tok = load_model(str(dest))
                t0 = time.perf_counter()
                ppl = evaluate_perplexity(model, tok, PerplexityConfig("wikitext2", "test", a.eval_seqlen, a.max_windows, 1, a.data_dir), progress=False)
                t_eval = time.perf_counter() - t0
            row = {"tag": tag, "tool": run["tool"], "method": method, "ratio": a.sparsity, "model": Path(a.model).name, "perplexity": ppl,
                   "sparsity_achieved": round(decoder_sparsity(model), 6), "time_s": {**run["time_s"], "eval": round(t_eval, 3)},
                   "recipe": run["recipe"], "versions": run["versions"], "calibration": calib, "saved_to": str(dest),
                   "date": time.strftime("%Y-%m-%d"), "command": shlex.join([Path(sys.executable).name, *sys.argv])}
            rows = [r for r in rows if r.get("tag") != tag] + [row]
            results_dir.mkdir(parents=True, exist_ok=True)
            rows_path.write_text(json.dumps(rows, indent=2) + "\n")
            log(f"[score] {tag}: ppl {ppl['value']:.2f}, decoder sparsity {row['sparsity_achieved']:.4f}")
    md = table(rows, Path(a.capllm_results) if a.capllm_results else REPO / "benchmarks" / "results" / Path(a.model).name)
    (results_dir / f"{Path(a.model).name}.md").write_text(md + "\n")
    print(md)


def table(rows: list[dict], capllm_dir: Path) -> str:
    def fmt(v, f="{:.2f}"):
        return "–" if v is None else f.format(v)

    out = ["| method | sparsity | llm-compressor ppl | capllm ppl | capllm / llm-compressor | llm-compressor prune (s) | capllm compress (s) | achieved sparsity (peer) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mine = capllm_dir / f"{r['method']}-{r['ratio']:g}.json"
        c = json.loads(mine.read_text()) if mine.exists() else {}
        cp = (c.get("perplexity") or {}).get("value")
        pp = r["perplexity"]["value"]
        ratio = cp / pp if cp else None
        out.append(f"| {r['method']} | {r['ratio']:.0%} | {pp:.2f} | {fmt(cp)} | {fmt(ratio, '{:.3f}')} | {r['time_s']['compress']:.0f} | "
                   f"{fmt(c.get('time_s', {}).get('compress'), '{:.0f}')} | {r['sparsity_achieved']:.4f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
