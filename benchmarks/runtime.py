"""Does a compressed model run faster, not only smaller? The bitmask kernel against dense.

Two parts, one JSON (``benchmarks/results/runtime/<name>.json``), a markdown table and a plot:

* ``kernels`` — per matrix shape of SmolLM2-135M and Qwen2.5-1.5B, batch 1: the packed kernel
  (``capllm.kernels.BitmaskMatrix.matmul``) against the dense GEMV ``F.linear`` at 30 / 50 / 70 %
  sparsity, values stored in fp32 and bf16, 1 and 2 threads. Every call is DRAM-bound as in a
  model's decode step: each case cycles through enough distinct copies of the matrix (≥ 4× the
  last-level cache, or `--working-set-mb`) that no copy is in cache when it is used. Reported as ratios
  ``dense time / kernel time`` beside the **bandwidth ceiling**
  ``dense bytes / (values + mask + row_ptr bytes)``. The bf16 rows compare with the dense fp32
  GEMV (what runs on a CPU) and also give the ceiling against dense bf16 bytes.
* ``models`` — end to end, each model in a fresh process (its own peak RSS, ``VmHWM``): greedy
  decode of ``--new-tokens`` (128) tokens at batch 1 after a short prompt, median of 3; one
  prefill forward of 512 tokens, median of 3; at 1 and 2 threads. Compressed models are loaded
  with ``capllm.load_compressed`` (``--execution``, default ``auto``); the dense baseline is the
  same architecture's uncompressed checkpoint in the same dtype.
* ``interleaved`` (``--interleaved ROUNDS``) — every model loaded into one process, their
  prefills and decodes taking turns ROUNDS times per thread count: on a machine whose speed
  drifts (a shared VM) these ratios are the ones to compare; they give no peak RSS.

    python benchmarks/runtime.py --dense smollm2-135m --compressed /path/to/cap50 --name smollm2-135m

Timings on a shared machine are upper bounds; the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "runtime"
SHAPES = {  # (out, in) of each distinct decoder linear
    "smollm2-135m": {"q/o": (576, 576), "k/v": (192, 576), "gate/up": (1536, 576), "down": (576, 1536)},
    "qwen2.5-1.5b": {"q/o": (1536, 1536), "k/v": (256, 1536), "gate/up": (8960, 1536), "down": (1536, 8960)},
}
SPARSITIES = (0.3, 0.5, 0.7)
PREFILL = 512


def _env() -> dict:
    import platform

    import torch

    from capllm.format.execution import last_level_cache_bytes
    from capllm.kernels import cpu_build
    from capllm.results import source_commit

    return {"capllm_commit": source_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": platform.processor() or platform.machine(),
            "cpu_model": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), None),
            "cores": os.cpu_count(), "torch": torch.__version__, "kernel_isa": cpu_build.best_isa(), "kernel_unavailable": cpu_build.unavailable_reason(), "kernel_serial": cpu_build.serial_reason(),
            "last_level_cache_mib": last_level_cache_bytes() >> 20, "loadavg": os.getloadavg()[0]}


# --- kernels ------------------------------------------------------------------------------------


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _cold_ms(fns, repeats: int = 5, device="cpu") -> float:
    """Median per-call ms of sweeps through ``fns`` (distinct matrices: DRAM-bound) — the probe's timer."""
    import torch

    from capllm.format.execution import sweep_ms

    return sweep_ms(fns, torch.device(device), repeats)


def kernel_rows(working_set_mb: int | None, device: str = "cpu") -> list[dict]:
    import torch
    import torch.nn.functional as F

    from capllm.format.execution import last_level_cache_bytes
    from capllm.kernels import BitmaskMatrix

    llc = last_level_cache_bytes() if device == "cpu" else 64 << 20  # a GPU's L2 is ≤ 64 MB
    target = working_set_mb << 20 if working_set_mb else max(256 << 20, 4 * llc)
    thread_counts = (1, 2) if device == "cpu" else (None,)
    rows = []
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for model, shapes in SHAPES.items():
            for name, (m, n) in shapes.items():
                copies = max(2, -(-target // (m * n * 4)))
                W = [torch.randn(m, n, generator=g).to(device) for _ in range(copies)]
                x = torch.randn(1, n, generator=g).to(device)
                for sparsity in SPARSITIES:
                    keep = [w * (torch.rand(m, n, generator=g) >= sparsity).to(device) for w in W]
                    packs = {dt: [BitmaskMatrix.from_dense(s, dt) for s in keep] for dt in (torch.float32, torch.bfloat16)}
                    dense_bf16 = [s.to(torch.bfloat16) for s in keep]
                    nnz = sum(p.nnz for p in packs[torch.float32]) / copies
                    for threads in thread_counts:
                        if threads:
                            torch.set_num_threads(threads)
                        dense = _cold_ms([lambda s=s: F.linear(x, s) for s in keep], device=device)
                        row = {"device": device, "model": model, "matrix": name, "shape": [m, n], "sparsity": sparsity, "threads": threads, "copies": copies,
                               "density": round(nnz / (m * n), 4), "dense_fp32_ms": round(dense, 4), "dense_fp32_gb_s": round(m * n * 4 / dense / 1e6, 2)}
                        xb = x.to(torch.bfloat16)
                        row["dense_bf16_ms"] = round(_cold_ms([lambda s=s: F.linear(xb, s) for s in dense_bf16], 3, device), 4)
                        for dt, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
                            k = _cold_ms([lambda p=p: p.matmul(xb if tag == "bf16" and device != "cpu" else x) for p in packs[dt]], device=device)
                            item = torch.finfo(dt).bits // 8
                            packed_bytes = nnz * item + m * ((n + 7) // 8) + 8 * (m + 1)
                            row[f"kernel_{tag}_ms"] = round(k, 4)
                            row[f"kernel_{tag}_gb_s"] = round(packed_bytes / k / 1e6, 2)
                            row[f"speedup_{tag}"] = round(dense / k, 3)
                            row[f"ceiling_{tag}"] = round(m * n * 4 / packed_bytes, 3)  # against dense fp32 bytes
                            if tag == "bf16":
                                row["ceiling_bf16_vs_dense_bf16"] = round(m * n * 2 / packed_bytes, 3)
                                row["speedup_bf16_vs_dense_bf16"] = round(row["dense_bf16_ms"] / k, 3)
                        rows.append(row)
                        print(json.dumps(row), file=sys.stderr, flush=True)
                    del keep, packs, dense_bf16
                del W
    return rows


# --- end to end ---------------------------------------------------------------------------------


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = round(int(v.split()[0]) / 1024, 1)
    return out


def _load(source: str, execution: str, sparse_dtype: str | None, device: str):
    """(model in eval mode, tokenizer, is it a capllm compressed directory); on CUDA in bf16."""
    import torch

    import capllm

    compressed = (Path(source) / "config.json").is_file() and "capllm" in json.loads((Path(source) / "config.json").read_text())
    if compressed:
        model, tok = capllm.load_compressed(source, device=device, execution=execution, sparse_dtype=sparse_dtype)
    else:
        model, tok = capllm.load_model(source, dtype=torch.float32)
    if device != "cpu":
        model.to(device=device, dtype=torch.bfloat16)
    return model.eval(), tok, compressed


def _inputs(model, tok, new_tokens: int, device: str):
    """The seeded 16-token prompt, the seeded PREFILL-token input and the greedy-decode kwargs."""
    import torch

    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    long = torch.randint(0, vocab, (1, PREFILL), generator=torch.Generator().manual_seed(1)).to(device)
    pad = getattr(tok, "eos_token_id", None) if tok is not None else None
    gen = dict(attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)
    return prompt, long, gen


def measure_model(source: str, execution: str, sparse_dtype: str | None, new_tokens: int, repeats: int, device: str = "cpu", prefill_repeats: int = 7) -> dict:
    """Run in a fresh process: load, decode, prefill; peak RSS (and peak GPU memory). On CUDA
    both models run in bf16 (the compressed one's kernel values too)."""
    import torch

    from capllm.format.execution import describe_execution

    t0 = time.perf_counter()
    model, tok, compressed = _load(source, execution, sparse_dtype, device)
    gpu = device != "cpu"
    load_s = time.perf_counter() - t0
    out = {"source": source, "device": device, "dtype": "bfloat16" if gpu else "float32", "compressed": compressed, "execution": execution if compressed else "dense model", "sparse_dtype": sparse_dtype,
           "load_s": round(load_s, 2), "rss_after_load_mib": _status()["VmRSS"], "loadavg_start": os.getloadavg()[0]}
    if compressed:
        out["paths"] = describe_execution(model)["summary"]
    prompt, long, gen = _inputs(model, tok, new_tokens, device)
    with torch.inference_mode():
        for threads in ((1, 2) if not gpu else (1,)):
            if not gpu:
                torch.set_num_threads(threads)
            model.generate(prompt, **{**gen, "max_new_tokens": 4, "min_new_tokens": 4})
            rates, seqs = [], None
            for _ in range(repeats):
                _sync(device)
                t = time.perf_counter()
                seqs = model.generate(prompt, **gen)
                _sync(device)
                rates.append(new_tokens / (time.perf_counter() - t))
            model(long)
            pre = []
            for _ in range(prefill_repeats):
                _sync(device)
                t = time.perf_counter()
                model(long)
                _sync(device)
                pre.append((time.perf_counter() - t) * 1e3)
            out[f"threads{threads}"] = {"decode_tok_s": round(statistics.median(rates), 2), "decode_tok_s_all": [round(r, 2) for r in rates],
                                        "prefill_512_ms": round(statistics.median(pre), 1), "prefill_512_ms_min": round(min(pre), 1), "prefill_512_ms_all": [round(p, 1) for p in pre]}
        out["greedy_tokens"] = seqs[0, prompt.shape[1]:].tolist()
    st = _status()
    out.update(peak_rss_mib=st["VmHWM"], loadavg_end=os.getloadavg()[0])
    if gpu:
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def measure_interleaved(specs: list, new_tokens: int, rounds: int, device: str = "cpu") -> dict:
    """All models in this one process, taking turns: per thread count, ``rounds`` times each model's
    512-token prefill and then each model's greedy decode. Drift on a shared machine then falls on
    every model alike, which separate processes (needed for each one's peak RSS) cannot give;
    ratios against the first (dense) model, of medians and of the fastest runs."""
    import torch

    loaded = [(label, _load(src, ex, sd, device)) for src, ex, sd, label in specs]
    models = [(label, model) for label, (model, _, _) in loaded]
    prompt, long, gen = _inputs(models[0][1], loaded[0][1][1], new_tokens, device)
    out = {"rounds": rounds, "labels": [label for label, _ in models]}
    with torch.inference_mode():
        for threads in ((1, 2) if device == "cpu" else (1,)):
            if device == "cpu":
                torch.set_num_threads(threads)
            pre = {label: [] for label, _ in models}
            dec = {label: [] for label, _ in models}
            for _, m in models:
                m(long)
                m.generate(prompt, **{**gen, "max_new_tokens": 4, "min_new_tokens": 4})
            for _ in range(rounds):
                for label, m in models:
                    _sync(device)
                    t = time.perf_counter()
                    m(long)
                    _sync(device)
                    pre[label].append((time.perf_counter() - t) * 1e3)
                for label, m in models:
                    _sync(device)
                    t = time.perf_counter()
                    m.generate(prompt, **gen)
                    _sync(device)
                    dec[label].append(new_tokens / (time.perf_counter() - t))
            base = models[0][0]
            out[f"threads{threads}"] = {label: {
                "prefill_512_ms": round(statistics.median(pre[label]), 1), "prefill_512_ms_min": round(min(pre[label]), 1),
                "prefill_vs_first": round(statistics.median(pre[label]) / statistics.median(pre[base]), 3),
                "prefill_vs_first_fastest": round(min(pre[label]) / min(pre[base]), 3),
                "decode_tok_s": round(statistics.median(dec[label]), 2), "decode_vs_first": round(statistics.median(dec[label]) / statistics.median(dec[base]), 3),
                "prefill_512_ms_all": [round(v, 1) for v in pre[label]], "decode_tok_s_all": [round(v, 2) for v in dec[label]]} for label, _ in models}
    return out


def model_row(source: str, execution: str, sparse_dtype: str | None, new_tokens: int, repeats: int, label: str, device: str = "cpu", prefill_repeats: int = 7) -> dict:
    cmd = [sys.executable, __file__, "--_measure", source, "--execution", execution, "--new-tokens", str(new_tokens), "--repeats", str(repeats), "--device", device,
           "--prefill-repeats", str(prefill_repeats)]
    if sparse_dtype:
        cmd += ["--sparse-dtype", sparse_dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"measuring {source} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["label"] = label
    print(json.dumps({k: v for k, v in row.items() if k != "greedy_tokens"}), file=sys.stderr, flush=True)
    return row


def _median_row(rows: list[dict]) -> dict:
    """One model's rounds → its medians (decode rate, prefill time, peak RSS), all values kept."""
    out = dict(rows[0])
    for t in ("threads1", "threads2"):
        if t in out:
            out[t] = {"decode_tok_s": round(statistics.median(r[t]["decode_tok_s"] for r in rows), 2),
                      "prefill_512_ms": round(statistics.median(r[t]["prefill_512_ms"] for r in rows), 1),
                      "prefill_512_ms_min": min(r[t].get("prefill_512_ms_min", r[t]["prefill_512_ms"]) for r in rows),
                      "decode_tok_s_rounds": [r[t]["decode_tok_s"] for r in rows], "prefill_512_ms_rounds": [r[t]["prefill_512_ms"] for r in rows]}
    out["peak_rss_mib"] = statistics.median(r["peak_rss_mib"] for r in rows)
    out["peak_rss_mib_rounds"] = [r["peak_rss_mib"] for r in rows]
    out["rounds"] = len(rows)
    return out


# --- report -------------------------------------------------------------------------------------


def _min_ratio(a: dict, b: dict) -> str:
    """Prefill ratio of the fastest runs (the least disturbed on a shared machine), when recorded."""
    if "prefill_512_ms_min" not in a or "prefill_512_ms_min" not in b:
        return "—"
    return f"{a['prefill_512_ms_min'] / b['prefill_512_ms_min']:.2f}×"


def tables(doc: dict) -> str:
    L = []
    if doc.get("kernels"):
        L += ["**Kernel vs dense GEMV, batch 1, DRAM-bound** (dense fp32 time / kernel time; ceiling = dense fp32 bytes / packed bytes)", "",
              "| model | matrix | out×in | sparsity | threads | dense fp32 ms (GB/s) | kernel fp32 (GB/s) | ceiling fp32 | kernel bf16 values | ceiling bf16 (vs dense bf16) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for r in doc["kernels"]:
            L.append(f"| {r['model']} | {r['matrix']} | {r['shape'][0]}×{r['shape'][1]} | {r['sparsity']:.0%} | {r['threads'] or r.get('device')} | {r['dense_fp32_ms']:.3f} ({r['dense_fp32_gb_s']:.1f}) | "
                     f"**{r['speedup_fp32']:.2f}×** ({r['kernel_fp32_gb_s']:.1f}) | {r['ceiling_fp32']:.2f}× | **{r['speedup_bf16']:.2f}×** | {r['ceiling_bf16']:.2f}× ({r['ceiling_bf16_vs_dense_bf16']:.2f}×) |")
    if doc.get("models"):
        base = next(r for r in doc["models"] if not r["compressed"])
        L += ["", f"**End to end, batch 1** (greedy decode of {doc['new_tokens']} tokens, prefill = one {PREFILL}-token forward; medians of {doc['repeats']} runs "
              f"in each of {doc['models'][0].get('rounds', 1)} alternating rounds; each model in its own process)", "",
              "| model | execution | threads | decode tok/s | vs dense | prefill 512 ms | vs dense (min of all runs) | peak RSS MiB | vs dense | layers per path |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in doc["models"]:
            for t in (1, 2):
                if f"threads{t}" not in r:
                    continue
                a, b = r[f"threads{t}"], base[f"threads{t}"]
                paths = ", ".join(f"{n} {p}" for p, n in (r.get("paths") or {}).items()) or "–"
                L.append(f"| {r['label']} | {r['execution']} | {t} | {a['decode_tok_s']:.1f} | **{a['decode_tok_s'] / b['decode_tok_s']:.2f}×** | {a['prefill_512_ms']:.0f} | "
                         f"{a['prefill_512_ms'] / b['prefill_512_ms']:.2f}× ({_min_ratio(a, b)}) | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / base['peak_rss_mib']:.2f}× | {paths} |")
    if doc.get("interleaved"):
        iv = doc["interleaved"]
        L += ["", f"**In one process, interleaved** ({iv['rounds']} rounds: each model's {PREFILL}-token prefill, then each model's decode; ratios against the first model)", "",
              "| model | threads | prefill 512 ms | vs dense (fastest runs) | decode tok/s | vs dense |", "|---|---|---|---|---|---|"]
        for t in (1, 2):
            for label, r in (iv.get(f"threads{t}") or {}).items():
                L.append(f"| {label} | {t} | {r['prefill_512_ms']:.0f} | {r['prefill_vs_first']:.3f}× ({r['prefill_vs_first_fastest']:.3f}×) | {r['decode_tok_s']:.1f} | {r['decode_vs_first']:.2f}× |")
    return "\n".join(L)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["kernels"] if r["threads"] in (1, None)]
    fig, axes = plt.subplots(1, len(SPARSITIES), figsize=(4.2 * len(SPARSITIES), 3.8), sharey=True)
    for ax, sp in zip(axes, SPARSITIES):
        sel = [r for r in rows if r["sparsity"] == sp]
        xs = range(len(sel))
        ax.bar([i - 0.2 for i in xs], [r["speedup_fp32"] for r in sel], 0.4, label="kernel, fp32 values")
        ax.bar([i + 0.2 for i in xs], [r["speedup_bf16"] for r in sel], 0.4, label="kernel, bf16 values")
        ax.scatter([i - 0.2 for i in xs], [r["ceiling_fp32"] for r in sel], marker="_", s=300, color="k", label="bandwidth ceiling")
        ax.scatter([i + 0.2 for i in xs], [r["ceiling_bf16"] for r in sel], marker="_", s=300, color="k")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(list(xs), [f"{'S' if r['model'].startswith('smol') else 'Q'} {r['matrix']}" for r in sel], rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{sp:.0%} sparse, 1 thread")
    axes[0].set_ylabel("speed-up over dense fp32 GEMV")
    axes[0].legend(fontsize=7)
    fig.suptitle("Bitmask kernel, batch 1, DRAM-bound (S = SmolLM2-135M, Q = Qwen2.5-1.5B shapes)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="smollm2-135m")
    ap.add_argument("--dense", default=None, help="the dense model (alias, hub id or directory)")
    ap.add_argument("--compressed", action="append", default=[], metavar="DIR[:LABEL]", help="a capllm compressed model directory (repeatable)")
    ap.add_argument("--execution", default="auto")
    ap.add_argument("--bf16-values", action="store_true", help="also measure each compressed model with bf16 value storage")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefill-repeats", type=int, default=7, help="512-token forwards per thread count (a prefill is ~1 s: more of them than decodes)")
    ap.add_argument("--rounds", type=int, default=2, help="measure the whole model list this many times, alternating; report medians")
    ap.add_argument("--working-set-mb", type=int, default=None,
                    help="MB of distinct copies each per-matrix case cycles through (default: 4x the last-level cache, at least 256; "
                         "a server CPU may report a shared L3 of hundreds of MB, and this caps the memory and time the grid takes)")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA: the Triton kernel, bf16 models)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--from-rows", type=Path, default=None, metavar="LOG",
                    help="no measuring: rebuild the JSON and tables from the per-model rows an interrupted run printed (one JSON object per line, "
                         "in the order dense, compressed…; each full set of --compressed/--bf16-values models is one round)")
    ap.add_argument("--interleaved", type=int, default=0, metavar="ROUNDS",
                    help="also load every model into one process and alternate their prefills and decodes ROUNDS times (ratios robust to drift; no peak RSS)")
    ap.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_interleaved", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sparse-dtype", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._measure:
        print(json.dumps(measure_model(a._measure, a.execution, a.sparse_dtype, a.new_tokens, a.repeats, a.device, a.prefill_repeats)))
        return
    if a._interleaved:
        print(json.dumps(measure_interleaved(json.loads(a._interleaved), a.new_tokens, a.interleaved, a.device)))
        return
    out = a.out or RESULTS / f"{a.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"command": "python benchmarks/runtime.py " + " ".join(sys.argv[1:]), "environment": _env(), "new_tokens": a.new_tokens, "repeats": a.repeats}
    if not a.skip_kernels and a.from_rows is None:
        doc["kernels"] = kernel_rows(a.working_set_mb, a.device)
    specs = []
    if a.dense:
        specs.append((a.dense, "dense", None, f"{a.name} dense"))
    for spec in a.compressed:
        src, _, label = spec.partition(":")
        label = label or Path(src).name
        specs.append((src, a.execution, None, label))
        if a.bf16_values and a.device == "cpu":
            specs.append((src, a.execution, "bfloat16", label + " (bf16 values)"))
    if a.from_rows is not None:
        rows = [json.loads(line) for line in a.from_rows.read_text().splitlines() if line.startswith('{"source"')]
        per = len(specs)
        rounds = [rows[i : i + per] for i in range(0, len(rows) - per + 1, per)]
        if not rounds:
            raise SystemExit(f"{a.from_rows}: fewer than one round ({per} models) of rows")
        doc["rebuilt_from"] = f"{a.from_rows} ({len(rounds)} full rounds of {per} models; rows without their greedy tokens)"
        write_doc(doc, out, rounds, a.rounds)
        print(doc["tables_md"])
        return
    rounds = []
    for _ in range(a.rounds if specs else 0):  # the whole list per round, so drift on a shared machine hits every model alike
        rounds.append([model_row(src, ex, sd, a.new_tokens, a.repeats, label, a.device, a.prefill_repeats) for src, ex, sd, label in specs])
        write_doc(doc, out, rounds, a.rounds)  # after every round: an interrupted run keeps what it measured
    if a.interleaved and not a.dense:
        raise SystemExit("runtime: --interleaved needs --dense (the ratios are against the dense model)")
    if a.interleaved:
        cmd = [sys.executable, __file__, "--_interleaved", json.dumps(specs), "--interleaved", str(a.interleaved), "--new-tokens", str(a.new_tokens), "--device", a.device]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"runtime: the interleaved measurement failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
        doc["interleaved"] = json.loads(res.stdout.strip().splitlines()[-1])
        write_doc(doc, out, rounds, a.rounds)
    if not rounds and not a.interleaved:  # kernels only
        write_doc(doc, out, [], a.rounds)
    print(doc["tables_md"])


def write_doc(doc: dict, out: Path, rounds: list[list[dict]], planned: int) -> None:
    """The medians over the finished ``rounds`` (of ``planned``), the tables, the JSON (atomic) and the plot."""
    if rounds:
        doc["model_rounds"] = rounds
        doc["rounds_planned"] = planned
        doc["models"] = models = [_median_row([r[i] for r in rounds]) for i in range(len(rounds[0]))]
        if models[0]["compressed"] is False and "greedy_tokens" in models[0]:
            for r in models[1:]:
                r["same_greedy_tokens_as_dense"] = sum(x == y for x, y in zip(r["greedy_tokens"], models[0]["greedy_tokens"])) / len(models[0]["greedy_tokens"])
    doc["environment"]["loadavg_end"] = os.getloadavg()[0]
    doc["tables_md"] = tables(doc)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(out)
    if doc.get("kernels"):
        plot(doc, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
