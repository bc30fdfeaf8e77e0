"""Layer-level output error of the low-rank / low-rank + sparse baselines on real SmolLM2-135M layers.

For a few decoder linears, capture their inputs ``X`` on calibration windows of the *dense* model
(enwiki, seed 0), compress each weight alone with every method at the same ratio and report the
relative output error ``‖(W − Ŵ)X‖_F / ‖WX‖_F`` and the time each method took. This isolates the
per-matrix numerics (and OATS's ``svd=full`` vs ``svd=warm``) from the sequential pipeline.

    flock /work/locks/heavy.lock python benchmarks/layer_errors.py --data-dir /work/shared/data
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from capllm.data.calibration import CalibrationConfig, load_calibration
from capllm.methods.base import get_method
from capllm.models.layers import find_linears
from capllm.models.loader import load_model

HERE = Path(__file__).resolve().parent

CONFIGS = {  # label: (method, options)
    "wanda": ("wanda", {}),
    "sparsegpt": ("sparsegpt", {}),
    "svd": ("svd", {}),
    "asvd": ("asvd", {}),
    "svd-llm": ("svd-llm", {}),
    "losparse": ("losparse", {}),
    "losparse iters=10": ("losparse", {"iters": 10}),
    "oats": ("oats", {}),
    "oats svd=warm": ("oats", {"svd": "warm"}),
    "sslc iters=5": ("sslc", {"iters": 5}),
    "sslc": ("sslc", {}),
    "sslc rank_share=0.15": ("sslc", {"rank_share": 0.15}),
    "sslc rank_share=0.5": ("sslc", {"rank_share": 0.5}),
    "sslc protect=0": ("sslc", {"protect": 0.0}),
}


def capture(model_name: str, blocks: list[int], locals_: list[str], nsamples: int, data_dir: str):
    model, tok = load_model(model_name)
    cal = load_calibration(tok, CalibrationConfig("enwiki", nsamples, 512, 0, data_dir))
    handles = [h for h in find_linears(model) if h.block_index in blocks and h.local_name in locals_]
    store = {h.name: [] for h in handles}
    hooks = [h.module.register_forward_hook(lambda m, i, o, name=h.name: store[name].append(i[0].reshape(-1, i[0].shape[-1]).clone()))
             for h in handles]
    with torch.no_grad():
        for w in cal.windows:
            model(w.unsqueeze(0))
    for hk in hooks:
        hk.remove()
    return {h.name: (h.weight_copy(), torch.cat(store[h.name])) for h in handles}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=os.environ.get("CAPLLM_DATA_DIR", "../shared/data"))
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--blocks", default="2,15,28")
    ap.add_argument("--layers", default="self_attn.q_proj,self_attn.k_proj,mlp.down_proj")
    ap.add_argument("--nsamples", type=int, default=8, help="calibration windows of 512 tokens")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    a = ap.parse_args()
    torch.set_num_threads(2)
    data = capture(a.model, [int(b) for b in a.blocks.split(",")], a.layers.split(","), a.nsamples, a.data_dir)
    labels = a.configs.split(",")
    rows = {}
    for name, (W, X) in data.items():
        m, n = W.shape
        ref = float((X @ W.t()).norm())

        class Handle:
            shape = (m, n)
            module = torch.nn.Linear(n, m, bias=False)

        for label in labels:
            method, opts = CONFIGS[label]
            comp = get_method(method)(a.ratio, None, opts).layer_compressor(Handle)
            for chunk in X.split(1024):
                comp.add_batch(chunk.unsqueeze(0), None)
            t0 = time.time()
            cw = comp.compress(W.clone())
            dt = time.time() - t0
            err = float((X @ (W - cw.dense()).t()).norm()) / ref
            rows.setdefault(label, {})[name] = {"rel_output_error": round(err, 5), "seconds": round(dt, 2),
                                                "rank": cw.rank, "nnz": cw.nnz, "kept": cw.kept_params(),
                                                "iters": cw.info.get("iters")}
            print(f"{name:36s} {label:22s} err={err:.4f} {dt:6.2f}s", flush=True)
    names = list(data)
    short = [n.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "") for n in names]
    md = ["| method | " + " | ".join(short) + " | mean | time (s) |", "|---" * (len(names) + 3) + "|"]
    for label in labels:
        errs = [rows[label][n]["rel_output_error"] for n in names]
        secs = sum(rows[label][n]["seconds"] for n in names)
        md.append(f"| {label} | " + " | ".join(f"{e:.4f}" for e in errs) + f" | {sum(errs) / len(errs):.4f} | {secs:.1f} |")
    table = "\n".join(md)
    print(table)
    out = HERE / "results" / a.model / f"layer_errors-{a.ratio:g}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": a.model, "ratio": a.ratio, "nsamples": a.nsamples, "seqlen": 512, "calib": "enwiki",
                               "date": time.strftime("%Y-%m-%d"), "results": rows, "table": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
