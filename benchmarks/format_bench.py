"""Dense vs compressed SmolLM2-135M on disk and at run time (CPU): the format benchmark.

Models, all at a 50 % budget of the decoder-linear parameters (fp32):

* ``dense``     — the unmodified model, saved as a plain checkpoint by ``capllm.format.save_dense``;
* ``wanda50``   — sparse only: made beforehand with ``capllm compress --method wanda --ratio 0.5
  --no-eval ... --out DIR`` (pass ``--wanda-dir DIR``);
* ``lowrank50`` — low-rank only: truncated SVD of every decoder linear at the uniform rank
  ``r = ⌊0.5·mn/(m+n)⌋`` (built here);
* ``mixed50``   — rank ``⌊r/4⌋`` SVD plus the magnitude-pruned residual, the largest
  ``⌊0.5·mn⌋ − ⌊r/4⌋(m+n)`` entries of ``W − U'V'ᵀ`` (built here).

Each (model, execution policy) is measured in its own fresh process: bytes on disk (decoder
linears, whole directory, bitmask index overhead), resident memory after load, load time, the
latency of one forward on 1×512 tokens (median of 5 after a warm-up) and greedy decode
throughput at batch 1 (64 new tokens, median of 3). Compressed models run twice: with the
``auto`` policy (what ``capllm.load_compressed`` picks) and with ``csr`` forced.

    flock /work/locks/heavy.lock python benchmarks/format_bench.py --wanda-dir /tmp/b/wanda50 --work /tmp/b

writes ``benchmarks/results/format/smollm2-135m.json`` and prints the markdown tables.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m"
FORWARD_TOKENS = 512
NEW_TOKENS = 64
REF_TOKENS = 128


def status_mib() -> dict[str, float]:
    """VmRSS, RssAnon (private memory), RssFile (mapped file pages, e.g. mmapped safetensors) and
    VmHWM (this process's peak RSS; unlike ru_maxrss it does not inherit the parent's) in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = round(int(rest.split()[0]) / 1024, 1)
    return out


def tensor_bytes(model) -> int:
    """Bytes held by the model's parameters and buffers (CSR: values + indices), shared counted once."""
    import torch

    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.layout == torch.sparse_csr:
            parts = [t.values(), t.col_indices(), t.crow_indices()]
        else:
            parts = [t]
        for p in parts:
            key = (p.untyped_storage().data_ptr(), p.storage_offset(), p.numel())
            if key in seen:
                continue
            seen.add(key)
            total += p.numel() * p.element_size()
    return total


# --- building the compressed models -------------------------------------------------------------


def build(work: Path) -> dict[str, Path]:
    import torch

    import capllm
    from capllm.engine.context import CompressionContext
    from capllm.format import save_dense
    from capllm.methods.base import CompressedWeight

    torch.set_num_threads(2)
    dirs = {"dense": work / "dense", "lowrank50": work / "lowrank50", "mixed50": work / "mixed50"}
    ids = torch.randint(0, 49152, (1, REF_TOKENS), generator=torch.Generator().manual_seed(0))
    if not dirs["dense"].exists():
        model, tok = capllm.load_model(MODEL)
        save_dense(model, dirs["dense"], tok)
    for name, quarter in (("lowrank50", False), ("mixed50", True)):
        if dirs[name].exists():
            continue
        t0 = time.time()
        model, tok = capllm.load_model(MODEL)
        ctx = CompressionContext(model, None, torch.device("cpu"), progress=False)
        ranks = []
        for h in ctx.linears:
            W = h.weight_copy()
            m, n = W.shape
            r = int(0.5 * m * n / (m + n))
            if quarter:
                r //= 4
            u, s, vh = torch.linalg.svd(W, full_matrices=False)
            U, V = u[:, :r] * s[:r].sqrt(), vh[:r].t() * s[:r].sqrt()
            S = None
            if quarter:
                R = W - U @ V.t()
                keep = int(0.5 * m * n) - r * (m + n)
                idx = R.abs().view(-1).topk(keep).indices
                S = torch.zeros(m * n)
                S[idx] = R.view(-1)[idx]
                S = S.view(m, n)
            ctx.apply(h, CompressedWeight(S=S, U=U, V=V, info={"construction": "svd" + ("+magnitude residual" if quarter else "")}))
            ranks.append(r)
        kept = sum(rec.kept_params for rec in ctx.records.values())
        with torch.inference_mode():
            ref = model(ids).logits
        result = {"method": "svd-uniform" + ("+magnitude" if quarter else ""), "ratio": 0.5, "model": model._capllm_source,
                  "params": {"dense_linear": ctx.dense_linear_params, "kept_linear": kept}, "ranks": sorted(set(ranks)),
                  "build_s": round(time.time() - t0, 1), "layers": [rec.as_dict() for rec in ctx.records.values()]}
        capllm.save_compressed(model, dirs[name], tokenizer=tok, result=result)
        from safetensors.torch import save_file

        save_file({"ids": ids, "logits": ref.contiguous()}, str(dirs[name] / "reference_logits.safetensors.bench"))
        print(f"built {name}: ranks {sorted(set(ranks))}, kept {kept:,} / {ctx.dense_linear_params:,}", file=sys.stderr)
    return dirs


# --- measuring one model in a fresh process ----------------------------------------------------


def measure(folder: Path, execution: str) -> dict:
    import torch

    torch.set_num_threads(2)
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import capllm
    from capllm.format import describe_execution, load_compressed
    from capllm.models.loader import _is_compressed_dir

    cfg = json.loads((folder / "config.json").read_text())
    getattr(transformers, cfg["architectures"][0])  # import the modeling code: time the load, not imports
    for p in folder.iterdir():  # warm the page cache: time the load, not the disk
        if p.is_file():
            p.read_bytes()
    gc.collect()
    before = status_mib()
    t0 = time.perf_counter()
    if _is_compressed_dir(folder):
        model, tok = load_compressed(folder, execution=execution)
    else:
        model, tok = capllm.load_model(str(folder))
    load_s = time.perf_counter() - t0
    gc.collect()
    after = status_mib()
    out = {"dir": folder.name, "execution": execution, "loadavg_at_start": os.getloadavg()[0], "load_s": round(load_s, 3),
           "rss_after_load_mib": after["VmRSS"], "rss_anon_after_load_mib": after["RssAnon"], "rss_file_after_load_mib": after["RssFile"],
           "rss_anon_load_delta_mib": round(after["RssAnon"] - before["RssAnon"], 1), "rss_peak_during_load_mib": after["VmHWM"],
           "tensor_mib_in_memory": round(tensor_bytes(model) / 2**20, 1),
           "paths": describe_execution(model)["summary"] or {"dense model": 1}}
    if "capllm" in cfg:
        out["storage"] = cfg["capllm"]["storage"]
    out["dir_bytes"] = sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and not p.name.endswith(".bench") and p.name != "result.json")
    ref = folder / "reference_logits.safetensors.bench"
    x = torch.randint(0, model.config.vocab_size, (1, FORWARD_TOKENS), generator=torch.Generator().manual_seed(1))
    prompt = tok("The history of the city begins with", return_tensors="pt").input_ids
    gen = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.inference_mode():
        if ref.exists():
            from safetensors.torch import load_file

            r = load_file(str(ref))
            out["max_abs_diff_vs_in_memory"] = float((model(r["ids"]).logits - r["logits"]).abs().max())
        for threads in (2, 1):
            torch.set_num_threads(threads)
            model(x)
            times = []
            for _ in range(5):
                t = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t)
            model.generate(prompt, max_new_tokens=4, min_new_tokens=4, **gen)
            rates = []
            for _ in range(3):
                t = time.perf_counter()
                g = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **gen)
                rates.append((g.shape[1] - prompt.shape[1]) / (time.perf_counter() - t))
            out[f"threads{threads}"] = {"forward_512_ms": round(1e3 * statistics.median(times), 1), "forward_512_ms_all": [round(1e3 * t, 1) for t in times],
                                        "decode_tok_s": round(statistics.median(rates), 2), "decode_tok_s_all": [round(r, 2) for r in rates]}
    end = status_mib()
    out.update({"rss_anon_after_runs_mib": end["RssAnon"], "rss_file_after_runs_mib": end["RssFile"], "rss_peak_mib": end["VmHWM"], "loadavg_at_end": os.getloadavg()[0]})
    return out


# --- the kernel crossover behind the ``auto`` rule ------------------------------------------------


def kernel_sweep() -> list[dict]:
    """Dense GEMM vs int32 CSR × dense for SmolLM2's shapes, by density and token count."""
    import torch
    import torch.nn.functional as F

    from capllm.format.modules import to_csr

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    rows = []
    for m, n in ((576, 576), (192, 576), (1536, 576), (576, 1536)):
        W = torch.randn(m, n, generator=g)
        for density in (0.5, 0.3, 0.1, 0.03, 0.01):
            S = W * (torch.rand(m, n, generator=g) < density)
            C = to_csr(S)
            for tokens in (1, 512):
                x = torch.randn(tokens, n, generator=g)
                with torch.inference_mode():
                    t = {}
                    for name, fn in (("dense", lambda: F.linear(x, S)), ("csr", lambda: C @ x.t())):
                        fn()
                        ts = []
                        for _ in range(7):
                            t0 = time.perf_counter()
                            fn()
                            ts.append(time.perf_counter() - t0)
                        t[name] = 1e3 * statistics.median(ts)
                rows.append({"shape": [m, n], "density": density, "tokens": tokens, "dense_ms": round(t["dense"], 4), "csr_ms": round(t["csr"], 4), "csr_over_dense": round(t["csr"] / t["dense"], 2)})
    return rows


def kernel_table(rows: list[dict]) -> str:
    dens = sorted({r["density"] for r in rows}, reverse=True)
    out = ["**CSR time / dense time** for one ``S x`` (int32 CSR via torch/MKL vs dense GEMM; < 1 means CSR is faster)", "",
           "| shape (out×in) | tokens | " + " | ".join(f"density {d:g}" for d in dens) + " |", "|---|---|" + "---|" * len(dens)]
    for shape in dict.fromkeys(tuple(r["shape"]) for r in rows):
        for tokens in (1, 512):
            cells = {r["density"]: r["csr_over_dense"] for r in rows if tuple(r["shape"]) == shape and r["tokens"] == tokens}
            out.append(f"| {shape[0]}×{shape[1]} | {tokens} | " + " | ".join(f"{cells[d]:.2f}" for d in dens) + " |")
    return "\n".join(out)


# --- tables --------------------------------------------------------------------------------------


def tables(rows: list[dict]) -> str:
    dense = next(r for r in rows if r["dir"] == "dense")
    dec_dense = next(r["storage"]["decoder_dense_bytes"] for r in rows if "storage" in r)
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    out = ["**Bytes on disk** (fp32; decoder = the 210 decoder-block linears; index = packed bitmasks, included in the decoder bytes)", "",
           "| model | decoder MiB | decoder / dense | index overhead MiB | whole directory MiB | whole / dense |", "|---|---|---|---|---|---|"]
    seen = set()
    for r in rows:
        if r["dir"] in seen:
            continue
        seen.add(r["dir"])
        st = r.get("storage")
        dec = st["decoder_bytes"] if st else dec_dense
        idx = st["index_overhead_bytes"] if st else 0
        out.append(f"| {r['dir']} | {mib(dec)} | {dec / dec_dense:.1%} | {mib(idx)} | {mib(r['dir_bytes'])} | {r['dir_bytes'] / dense['dir_bytes']:.1%} |")
    out += ["", "**Memory and load** (each row a fresh process; RSS split into private memory (anon) and mapped file pages (file: "
            "the safetensors mmap, reclaimable); tensors = bytes of parameters and buffers, CSR counted as values + int32 indices)", "",
            "| model | execution (layers per path) | load s | tensors MiB | RSS anon after load MiB | RSS file after load MiB | peak RSS during load MiB | RSS anon after the runs MiB |",
            "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paths = ", ".join(f"{n} {p}" for p, n in r["paths"].items())
        out.append(f"| {r['dir']} | {r['execution']}: {paths} | {r['load_s']:.2f} | {r['tensor_mib_in_memory']:.0f} | {r['rss_anon_after_load_mib']:.0f} | "
                   f"{r['rss_file_after_load_mib']:.0f} | {r['rss_peak_during_load_mib']:.0f} | {r['rss_anon_after_runs_mib']:.0f} |")
    for threads in (2, 1):
        key = f"threads{threads}"
        d = dense[key]
        out += ["", f"**Latency, {threads} thread{'s' if threads > 1 else ''}** (batch 1; forward = one 1×512 forward, median of 5; decode = greedy, "
                f"{NEW_TOKENS} new tokens, median of 3; Δ: + is slower than dense)", "",
                "| model | execution | forward 1×512 ms | Δ vs dense | decode tok/s | Δ time/token vs dense | max abs Δ logits vs in-memory model |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            t = r[key]
            fw = t["forward_512_ms"] / d["forward_512_ms"] - 1
            dc = d["decode_tok_s"] / t["decode_tok_s"] - 1
            diff = r.get("max_abs_diff_vs_in_memory")
            out.append(f"| {r['dir']} | {r['execution']} | {t['forward_512_ms']:.0f} | {fw:+.0%} | {t['decode_tok_s']:.1f} | {dc:+.0%} | {'–' if diff is None else f'{diff:.1e}'} |")
    return "\n".join(out)


def measure_in_fresh_process(folder: Path, execution: str, name: str) -> dict:
    cmd = [sys.executable, __file__, "--measure", str(folder), "--execution", execution]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if proc.returncode != 0:
        raise SystemExit(f"measuring {folder} ({execution}) failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["dir"] = name
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def remeasure(a: argparse.Namespace) -> None:
    """Replace the named rows of an existing result file by fresh measurements; the replaced
    rows are kept under ``superseded_rows`` so the file still shows what was thrown away."""
    doc = json.loads(a.out.read_text())
    for spec in a.remeasure:
        name, _, execution = spec.partition(":")
        i = next((k for k, r in enumerate(doc["rows"]) if r["dir"] == name and r["execution"] == execution), None)
        if i is None:
            raise SystemExit(f"{a.out} has no row {spec}")
        folder = a.wanda_dir if name == "wanda50" and a.wanda_dir else a.work / name
        row = measure_in_fresh_process(folder, execution, name)
        row["remeasured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        doc.setdefault("superseded_rows", []).append(doc["rows"][i])
        doc["rows"][i] = row
        doc.setdefault("remeasure_commands", []).append("python benchmarks/format_bench.py " + " ".join(sys.argv[1:]))
    doc["tables_md"] = tables(doc["rows"]) + "\n\n" + kernel_table(doc["kernels"])
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(doc["tables_md"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/capllm_format_bench"), help="where the model directories live (not in git)")
    ap.add_argument("--wanda-dir", type=Path, default=None, help="output of capllm compress --method wanda --ratio 0.5 (default WORK/wanda50)")
    ap.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--execution", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "format" / f"{MODEL}.json")
    ap.add_argument("--remeasure", action="append", default=[], metavar="MODEL:EXECUTION",
                    help="measure only this row again (e.g. wanda50:auto, when another job disturbed it) and update --out in place")
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(a.measure, a.execution)))
        return
    if a.remeasure:
        remeasure(a)
        return
    dirs = build(a.work)
    wanda = a.wanda_dir or a.work / "wanda50"
    if not (wanda / "config.json").exists():
        raise SystemExit(f"{wanda} has no saved model: run capllm compress --method wanda --ratio 0.5 --no-eval --out {wanda} first")
    plan = [(dirs["dense"], "auto"), (wanda, "auto"), (wanda, "csr"), (dirs["lowrank50"], "auto"), (dirs["mixed50"], "auto"), (dirs["mixed50"], "csr")]
    rows = [measure_in_fresh_process(folder, execution, "wanda50" if folder == wanda else folder.name) for folder, execution in plan]
    kernels = kernel_sweep()
    import platform

    import torch

    doc = {"model": MODEL, "date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()}-core CPU ({platform.machine()}), fp32, torch {torch.__version__}",
           "command": "python benchmarks/format_bench.py " + " ".join(sys.argv[1:]), "rows": rows, "kernels": kernels, "tables_md": tables(rows) + "\n\n" + kernel_table(kernels)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(doc["tables_md"])


if __name__ == "__main__":
    main()
