"""How ``capllm compress`` scales: measure small cells, fit per-stage cost models, predict CAP on
Llama-3-8B and Llama-3-70B (bf16 checkpoints) on this CPU and on one 80 GB GPU.

    python benchmarks/scale.py make-model --shape llama3-8b --blocks 2 --out DIR
    python benchmarks/scale.py measure --models shape:w1024:2,shape:llama3-8b:2,smollm2-135m --methods cap,sparsegpt,wanda
    python benchmarks/scale.py probe --device cpu          # matmul / eigh throughput (and RPCA s/iteration)
    python benchmarks/scale.py fit                         # → results/scale/{fit.json,scale.md,peak_rss_vs_checkpoint.png}

``make-model``: a random-weight LLaMA checkpoint with a real model's widths, heads, kv-heads and
vocabulary but only K decoder blocks (weights N(0, 0.02), norms 1: HF's own init with
``initializer_range = 0.02``), saved with ``save_pretrained`` (safetensors) plus a tokenizer
(SmolLM2's when it is cached and the vocabulary has ≥ 49,152 ids, else a BPE trained on the
repository's markdown, which is also written as ``corpus.txt``) and ``scale_shape.json`` (the
full model's layer count). ``measure``: one ``capllm compress --no-eval --save none`` process per
(model, method), CAP with a fresh ``stage1_dir`` so Stage 1 is never cached; one JSON per cell
(skipped when it exists) and ``scale.json`` with all of them. ``fit``: the models below, by
non-negative least squares on the measured seconds / MiB of the CPU cells.

Features of a cell (T calibration tokens, L blocks, hidden h, vocab V; sums over decoder linears
``m × n`` = out × in; ``it`` = Robust-PCA iterations of that matrix, read from Stage 1's manifest)::

    P = Σ m n     G = Σ n²     O = Σ (n³ + m n²)     R = Σ it · min(m,n)² (m + n)     B = checkpoint bytes
    TPG = T (P + G)  (forwards + Gram accumulation)     TP = T P     TH = T V h  (LM head)     LTh = L T h

    time  load_model    = a B + b                  stage1 − stage1_rpca = a TPG + b LTh
          stage1_rpca   = a R   (Gram + eigh per iteration)              fisher = a TP + b TH  (block-wise backward)
          stage2_scores = a P                      stage2_final = a P     refit = a TPG + b O  (OBS solves)
          other         = a LTh + b  (total minus the stages above and evaluation)
          sparsegpt, wanda: compress = a TPG + b O  /  a TPG
    peak RSS (MiB) = E + c0 + c1 W + c2 A,  E = B − P · bytes per weight (embeddings, head and norms: resident
                     through capture and evaluation; the dense blocks' pages are given back once read and the
                     compressed blocks are memory-mapped from the work directory), W = 4 (Σ_block m n + Σ_block n²)
                     (one block in fp32 and its Grams), A = 4 T h (one fp32 copy of the hidden states); on a GPU
                     the W term is not on the host.
    peak GPU = k · (weights outside the blocks + one block in the compute dtype + its fp32 Grams
               + 48 max(m n) (six float64 RPCA arrays) + 12 seqlen V (logits) + 16 seqlen I);
               k = 1 (a structural estimate) unless GPU cells measure it.
    disk = capllm.workdir.disk_estimate of the target (the figure the run itself checks first).

GPU time = CPU-fitted time of each stage / its GPU speed-up ρ, taken from (1) GPU cells (measured
with ``benchmarks/gpu_scale.sh``), else (2) a GPU ``probe`` JSON, else (3) an assumption (stated
in the output): 400 TFLOP/s bf16 matmul and 2 TFLOP/s effective float64 ``eigh``, against this
CPU (matmul stages: its fp32 matmul probe; Robust PCA: its fitted rate, 7.5 R flops per
iteration). Host-side stages (load, scores, selection, other) keep this CPU's time unless GPU
cells measured them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "scale"
GIB, MIB = 2**30, 2**20


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int  # of the full model (0: only the blocks built)
    vocab: int
    tied: bool = False


SHAPES = {  # public configs (hidden, intermediate, heads, kv heads, layers, vocab, tied embeddings)
    "llama3-8b": Shape(4096, 14336, 32, 8, 32, 128256),
    "llama3-70b": Shape(8192, 28672, 64, 8, 80, 128256),
    "qwen2.5-1.5b": Shape(1536, 8960, 12, 2, 28, 151936, True),
    "qwen2.5-0.5b": Shape(896, 4864, 14, 2, 24, 151936, True),
    "smollm2-135m": Shape(576, 1536, 9, 3, 30, 49152, True),
    # widths for the fit: Llama-3's proportions (intermediate 3.5 h, head dim 128, kv = h / 4)
    "w512": Shape(512, 1792, 4, 1, 0, 49152),
    "w1024": Shape(1024, 3584, 8, 2, 0, 49152),
    "w2048": Shape(2048, 7168, 16, 4, 0, 49152),
    "tiny": Shape(64, 224, 4, 2, 0, 512),  # tests
}
TARGETS = ("llama3-8b", "llama3-70b")
# stage → (features, how its seconds are read from time_s); "other" is what the stages leave
CAP_STAGES = {"load_model": ["B", "one"], "stage1_stats": ["TPG", "LTh"], "stage1_rpca": ["R"], "fisher": ["TP", "TH"],
              "stage2_scores": ["P"], "stage2_final": ["P"], "refit": ["TPG", "O"], "other": ["LTh", "one"]}
BASE_STAGES = {"sparsegpt": {"load_model": ["B", "one"], "compress": ["TPG", "O"], "other": ["LTh", "one"]},
               "wanda": {"load_model": ["B", "one"], "compress": ["TPG"], "other": ["LTh", "one"]}}
HOST_STAGES = ("load_model", "stage2_scores", "stage2_final", "other")  # run on the CPU of a GPU machine too
EVAL_STAGES = ("eval_data", "eval_dense", "eval", "save", "zeroshot", "generation", "generation_dense")  # not modelled: left out of "other"
ASSUMED_GPU = {"matmul_flops": 400e12, "eigh64_flops": 2e12,
               "why": "assumption, no GPU measurement: ~40 % of an H100/H200's dense bf16 peak (989 / ~790 TFLOP/s) for the block "
                      "forwards, Grams, backward and OBS; 2 TFLOP/s effective for float64 syevd (cuSOLVER runs far below the fp64 peak)"}
RPCA_FLOPS_PER_R = 7.5  # one iteration, m ≥ n: Gram 2mn² + products 4mn² + eigh 9n³ ≈ 6–9 × n²(m + n)
DEFAULT_ITERS = 36  # Robust-PCA iterations per matrix on real weights (33–39 on SmolLM2, capllm.decompose.rpca)


# --- shapes and features -----------------------------------------------------------------------

def block_linears(s: Shape) -> list[tuple[int, int]]:
    kv = s.kv_heads * (s.hidden // s.heads)
    h, i = s.hidden, s.intermediate
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # q k v o gate up down (out, in)


def shape_params(s: Shape, blocks: int) -> int:
    return blocks * (sum(m * n for m, n in block_linears(s)) + 2 * s.hidden) + s.vocab * s.hidden * (1 if s.tied else 2) + s.hidden


def features(lin: list, iters: list, blocks: int, T: int, hidden: int, vocab: int, ckpt_bytes: float, wbytes: int = 2) -> dict:
    per = lin[: len(lin) // blocks]
    f = {"P": sum(m * n for m, n in lin), "G": sum(n * n for _, n in lin), "O": sum(n**3 + m * n * n for m, n in lin),
         "R": sum(it * min(m, n) ** 2 * (m + n) for (m, n), it in zip(lin, iters)), "B": ckpt_bytes, "one": 1.0}
    f["E"] = max(ckpt_bytes - f["P"] * wbytes, 0.0)  # the weights outside the decoder blocks (embeddings, head, norms)
    f.update(TPG=T * (f["P"] + f["G"]), TP=T * f["P"], TH=T * vocab * hidden, LTh=blocks * T * hidden,
             W=4 * (sum(m * n for m, n in per) + sum(n * n for _, n in per)), A=4 * T * hidden)
    return {k: float(v) for k, v in f.items()}


def target_features(name: str, T: int, iters: int, wbytes: int = 2) -> dict:
    s = SHAPES[name]
    lin = block_linears(s) * s.layers
    return features(lin, [iters] * len(lin), s.layers, T, s.hidden, s.vocab, shape_params(s, s.layers) * wbytes, wbytes)


def cell_features(c: dict) -> dict:
    a = c["arch"]
    wbytes = torch.empty(0, dtype=getattr(torch, c["stored_dtype"])).element_size()
    it = c.get("rpca_iterations") or [0] * len(c["linears"])
    return features(c["linears"], it, a["blocks"], c["calibration"]["tokens"], a["hidden"], a["vocab"], c["params"]["whole_model_dense"] * wbytes, wbytes)


def gpu_struct_bytes(s: Shape, blocks_lin: list, seqlen: int, wbytes: int = 2, cbytes: int = 2) -> float:
    outside = (s.vocab * s.hidden * (1 if s.tied else 2) + s.hidden) * wbytes
    block = (sum(m * n for m, n in blocks_lin) + 2 * s.hidden) * cbytes
    return outside + block + 4 * sum(n * n for _, n in blocks_lin) + 48 * max(m * n for m, n in blocks_lin) + 12 * seqlen * s.vocab + 16 * seqlen * s.intermediate


def arch_of(model_dir: Path) -> dict:
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    meta = model_dir / "scale_shape.json"
    extra = json.loads(meta.read_text()) if meta.exists() else {}
    return {"hidden": cfg["hidden_size"], "intermediate": cfg.get("intermediate_size"), "vocab": cfg["vocab_size"], "blocks": cfg["num_hidden_layers"],
            "tied": bool(cfg.get("tie_word_embeddings", False)), "synthetic": bool(extra), "shape": extra.get("shape"),
            "full_layers": extra.get("full_layers") or cfg["num_hidden_layers"]}


def corpus_text() -> str:
    files = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(HERE.glob("*.md"))]
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files if f.is_file())


# --- make-model --------------------------------------------------------------------------------

def tokenizer_for(vocab: int, text: str):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from capllm.utils import cache_dir

    smol = cache_dir() / "models" / "smollm2-135m"
    if vocab >= 49152 and (smol / "config.json").exists():  # no download: only a cached copy
        return AutoTokenizer.from_pretrained(smol), "smollm2-135m"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    size = min(vocab, 8192)
    tok.train_from_iterator(text.split("\n\n"), trainers.BpeTrainer(vocab_size=size, special_tokens=["<|endoftext|>"], show_progress=False,
                                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>"), f"bpe-{size} trained on the repository's markdown"


def cmd_make_model(a) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    s, out = SHAPES[a.shape], Path(a.out)
    if (out / "config.json").exists():
        print(f"{out} exists", file=sys.stderr)
        return
    text = corpus_text()
    tok, tok_src = tokenizer_for(s.vocab, text)
    cfg = LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                      num_hidden_layers=a.blocks, vocab_size=s.vocab, tie_word_embeddings=s.tied, max_position_embeddings=8192,
                      initializer_range=0.02, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    dtype = getattr(torch, a.dtype)
    dev = a.init_device if a.init_device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(a.seed)
    t = time.perf_counter()
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)  # HF init: N(0, initializer_range), norms 1
    model.to("cpu")
    std = float(model.model.layers[0].mlp.down_proj.weight.detach().float()[:256].std())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "corpus.txt").write_text(text, encoding="utf-8")
    meta = {"shape": a.shape, **asdict(s), "blocks": a.blocks, "full_layers": s.layers or a.blocks, "dtype": a.dtype, "init_std": 0.02,
            "init_std_measured": round(std, 5), "tokenizer": tok_src, "params": sum(p.numel() for p in model.parameters()), "seed": a.seed,
            "build_s": round(time.perf_counter() - t, 1)}
    (tmp / "scale_shape.json").write_text(json.dumps(meta, indent=2) + "\n")
    tmp.rename(out)
    print(json.dumps(meta))


def cmd_fits(a) -> None:
    """The most blocks (≤ --max) whose checkpoint plus CAP's work directory fit in --dir's free disk."""
    from capllm.workdir import disk_estimate

    s, free = SHAPES[a.shape], shutil.disk_usage(a.dir).free * a.fraction
    best = 0
    for k in range(1, a.max + 1):
        need = shape_params(s, k) * 2 + disk_estimate(meta_model(s, k), "cap", a.nsamples, a.seqlen, "none", False)["total"]
        if need <= free:
            best = k
    print(best)


def meta_model(s: Shape, blocks: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                      num_hidden_layers=blocks, vocab_size=s.vocab, tie_word_embeddings=s.tied)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)


# --- measure -----------------------------------------------------------------------------------

def resolve_model(spec: str, a) -> Path:
    if spec.startswith("shape:"):
        _, shape, *rest = spec.split(":")
        blocks = int(rest[0]) if rest else 2
        d = Path(a.models_dir) / f"{shape}-b{blocks}-{a.model_dtype}"
        if not (d / "config.json").exists():
            subprocess.run([sys.executable, __file__, "make-model", "--shape", shape, "--blocks", str(blocks), "--dtype", a.model_dtype, "--out", str(d)], check=True)
        return d
    if Path(spec).is_dir():
        return Path(spec)
    from capllm.models.loader import ensure_alias_checkpoint

    return ensure_alias_checkpoint(spec)  # a built-in alias (fetched once)


def run_cell(model_dir: Path, spec: str, method: str, name: str, a) -> dict | None:
    run = Path(a.work) / name
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    arch = arch_of(model_dir)
    evaluate = a.eval and not arch["synthetic"]
    calib = str(model_dir / "corpus.txt") if a.calib == "corpus" else a.calib
    cmd = [sys.executable, "-m", "capllm", "compress", "--model", str(model_dir), "--method", method, "--ratio", str(a.ratio), "--calib", calib,
           "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--device", a.device, "--dtype", a.dtype, "--save", a.save,
           "--out", str(run / "out"), "--quiet", *([] if evaluate else ["--no-eval"])]
    if method.startswith("cap"):
        cmd += ["--option", f"stage1_dir={run / 'stage1'}"] + (["--option", f"rpca_max_iter={a.rpca_max_iter}"] if a.rpca_max_iter else [])
    for o in a.option:
        cmd += ["--option", o]
    print(f"[{name}] {' '.join(cmd)}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    with open(run / "log.txt", "w") as log:
        limit = min(a.timeout or float("inf"), (a.deadline - time.time()) if a.deadline else float("inf"))
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=None if limit == float("inf") else max(1.0, limit))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the capllm process this call started, and its children
            proc.wait()
            rc = "timeout"
    wall = round(time.perf_counter() - t, 1)
    res_path = run / "out" / "result.json"
    if rc != 0 or not res_path.exists():
        tail = (run / "log.txt").read_text(errors="replace")[-3000:]
        (Path(a.out) / f"{name}.failed.json").write_text(json.dumps({"cell": name, "rc": rc, "wall_s": wall, "command": cmd, "log_tail": tail}, indent=2) + "\n")
        print(f"[{name}] FAILED rc={rc} after {wall} s:\n{tail[-800:]}", file=sys.stderr)
        return None
    r = json.loads(res_path.read_text())
    man = run / "stage1" / "manifest.json"
    its = None
    if man.exists():
        mats = json.loads(man.read_text())["matrices"]
        its = [mats[x["name"]]["iterations"] for x in r["layers"]]
    from capllm.results import environment

    cell = {"cell": name, "model": spec, "model_dir": str(model_dir), "arch": arch, "method": method, "ratio": r["ratio"],
            "calibration": {**(r.get("calibration") or {}), "tokens": a.nsamples * a.seqlen}, "device": r["device"],
            "compute_dtype": r.get("compute_dtype"), "stored_dtype": r.get("stored_dtype"), "rpca_max_iter": a.rpca_max_iter or None,
            "time_s": r["time_s"], "peak_by_stage": r.get("peak_by_stage"), "peak_rss_mb": r["peak_rss_mb"], "peak_cuda_mb": r.get("peak_cuda_mb"),
            "params": r["params"], "disk_estimate_bytes": r.get("disk_estimate_bytes"), "perplexity": r.get("perplexity"),
            "perplexity_dense": r.get("perplexity_dense"), "linears": [x["shape"] for x in r["layers"]], "rpca_iterations": its,
            "process_wall_s": wall, "command": cmd, "environment": environment(), "date": date.today().isoformat()}
    if not a.keep:
        shutil.rmtree(run, ignore_errors=True)
    return cell


def cmd_measure(a) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for spec in [m for m in a.models.split(",") if m]:
        model_dir = resolve_model(spec, a)
        for method in [m for m in a.methods.split(",") if m]:
            tag = Path(spec).name.replace(":", "-") if not spec.startswith("shape:") else model_dir.name
            name = f"{tag}__{method}__n{a.nsamples}x{a.seqlen}" + (f"__it{a.rpca_max_iter}" if a.rpca_max_iter and method.startswith("cap") else "") \
                + ("__eval" if a.eval and not arch_of(model_dir)["synthetic"] else "") + f"__{a.device.replace(':', '')}"
            if (out / f"{name}.json").exists():
                print(f"[{name}] done before, skipped", file=sys.stderr)
                continue
            if a.deadline and a.deadline - time.time() < 15:
                print(f"[{name}] skipped: --deadline reached", file=sys.stderr)
                continue
            cell = run_cell(model_dir, spec, method, name, a)
            if cell:
                (out / f"{name}.json").write_text(json.dumps(cell, indent=1) + "\n")
                (out / f"{name}.failed.json").unlink(missing_ok=True)
                print(f"[{name}] total {cell['time_s']['total']:.1f} s, peak RSS {cell['peak_rss_mb']:.0f} MiB, GPU {cell['peak_cuda_mb']} MiB", file=sys.stderr)
    cells = load_cells(out)
    from capllm.results import environment

    (out / "scale.json").write_text(json.dumps({"environment": environment(), "cells": cells}, indent=1) + "\n")
    print(f"wrote {out / 'scale.json'} ({len(cells)} cells)", file=sys.stderr)


def load_cells(d: Path) -> list[dict]:
    skip = {"scale.json", "fit.json", "real.json"}  # real.json: benchmarks/scale_real.py's table, not a cell
    out = [json.loads(p.read_text()) for p in sorted(Path(d).glob("*.json")) if p.name not in skip and not p.name.endswith(".failed.json")
           and not p.name.startswith(("probe", "kill-resume"))]
    return [c for c in out if isinstance(c, dict) and "device" in c]


def cmd_summary(a) -> None:
    """One screen: per cell the seconds and peak GPU / host memory at the end of each stage."""
    d = Path(a.dir)
    for c in load_cells(d):
        t, pk = c["time_s"], c.get("peak_by_stage") or {}
        g, r = pk.get("gpu_mb", {}), pk.get("rss_mb", {})
        print(f"{c['cell']}: {c['arch']['blocks']} blocks, {c['calibration']['tokens']} tokens, total {t['total']:.0f} s, "
              f"peak RSS {c['peak_rss_mb'] / 1024:.1f} GiB, peak GPU {(c.get('peak_cuda_mb') or 0) / 1024:.1f} GiB")
        ks = [k for k in t if k != "total"]
        print("    seconds: " + ", ".join(f"{k} {t[k]:.1f}" for k in ks))
        for label, src in (("GPU GiB", g), ("RSS GiB", r)):
            if src:
                print(f"    {label}: " + ", ".join(f"{k} {src[k] / 1024:.2f}" for k in ks if k in src))
    for p in sorted(d.glob("*.failed.json")):
        f = json.loads(p.read_text())
        print(f"{f['cell']}: FAILED rc={f['rc']} after {f['wall_s']} s: {f['log_tail'].strip().splitlines()[-1][:160] if f['log_tail'].strip() else ''}")


# --- probe -------------------------------------------------------------------------------------

def _best(fn, device: str, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def probe(device: str, n: int, ne: int, rpca_shapes: list, rpca_iters: int) -> dict:
    out = {"device": device, "name": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu", "threads": torch.get_num_threads(), "n": n, "eigh_n": ne}
    dts = ("float32", "float64", "bfloat16") if device.startswith("cuda") else ("float32", "float64")
    for dt in dts:
        x = torch.randn(n, n, device=device, dtype=getattr(torch, dt))
        x @ x
        out[f"matmul_{dt}_flops"] = 2 * n**3 / _best(lambda: x @ x, device)
    if ne:
        g = torch.randn(ne, ne, device=device, dtype=torch.float64)
        g = g @ g.T
        torch.linalg.eigh(g)
        out["eigh64_flops"] = 9 * ne**3 / _best(lambda: torch.linalg.eigh(g), device, 2)  # syevd with vectors ≈ 9 n³ flops
    from capllm.decompose import rpca

    out["rpca_iter_s"] = {}
    for m, k in rpca_shapes:
        W = torch.randn(m, k) * 0.02
        r = [None]
        t = _best(lambda: r.__setitem__(0, rpca(W, max_iter=rpca_iters, tol=0.0, device=device)), device, 1)
        out["rpca_iter_s"][f"{m}x{k}"] = t / r[0].iterations
    return out


def cmd_probe(a) -> None:
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.rpca_shapes.split(",") if s]
    p = probe(a.device, a.n, a.eigh_n, shapes, a.rpca_iters)
    from capllm.results import environment

    p.update(environment=environment(), date=date.today().isoformat(), command="python " + " ".join(sys.argv))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(p, indent=2) + "\n")
    print(json.dumps({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in p.items() if k != "environment"}))


# --- fit and predict ---------------------------------------------------------------------------

def stage_seconds(c: dict) -> dict:
    t = dict(c["time_s"])
    out = {"load_model": t.get("load_model", 0.0)}
    if c["method"].startswith("cap"):
        out.update(stage1_stats=t.get("stage1", 0.0) - t.get("stage1_rpca", 0.0), stage1_rpca=t.get("stage1_rpca", 0.0), fisher=t.get("fisher", 0.0),
                   stage2_scores=t.get("stage2_scores", 0.0), stage2_final=t.get("stage2_final", 0.0), refit=t.get("refit", 0.0))
        used = sum(out.values()) - out["stage1_stats"] - out["stage1_rpca"] + t.get("stage1", 0.0)
    else:
        out["compress"] = t.get("compress", 0.0)
        used = sum(out.values())
    extra = sum(v for k, v in t.items() if k in EVAL_STAGES)
    out["other"] = max(0.0, t["total"] - used - extra)
    return out


def nnls_fit(rows: list[dict], ys: list[float], feats: list[str]) -> tuple[dict, list[float]]:
    import numpy as np
    from scipy.optimize import nnls

    A = np.array([[r[f] for f in feats] for r in rows], dtype=float)
    y = np.array(ys, dtype=float)
    scale = np.where(np.abs(A).max(0) > 0, np.abs(A).max(0), 1.0)
    coef, _ = nnls(A / scale, y)
    coef = coef / scale
    return dict(zip(feats, coef.tolist())), (A @ coef).tolist()


def fit_block(cells: list[dict], stages: dict, value) -> dict:
    out = {}
    rows = [cell_features(c) for c in cells]
    for st, feats in stages.items():
        ys = [value(c)[st] for c in cells]
        coef, pred = nnls_fit(rows, ys, feats)
        res = [{"cell": c["cell"], "measured": round(y, 3), "fitted": round(p, 3), "rel_err": round((p - y) / y, 3) if y > 1e-9 else None}
               for c, y, p in zip(cells, ys, pred)]
        out[st] = {"features": feats, "coef": coef, "residuals": res}
    return out


def apply(fit: dict, f: dict) -> dict:
    return {st: sum(v * f[k] for k, v in m["coef"].items()) for st, m in fit.items()}


def cmd_fit(a) -> None:
    d = Path(a.results)
    cells = load_cells(d) + (load_cells(Path(a.gpu_results)) if a.gpu_results else [])
    cpu = [c for c in cells if c["device"] == "cpu"]
    gpu = [c for c in cells if c["device"].startswith("cuda") and c["method"].startswith("cap")]
    cap = [c for c in cpu if c["method"] == "cap"]
    if not cap:
        raise SystemExit(f"no CPU cap cells in {d}: run `measure` first")
    fits = {"cap": fit_block(cap, CAP_STAGES, stage_seconds)}
    for m, st in BASE_STAGES.items():
        if cs := [c for c in cpu if c["method"] == m]:
            fits[m] = fit_block(cs, st, stage_seconds)
    # peak RSS − outside-block weights = c0 + c1 W + c2 A  (MiB), on cells without evaluation (its peak is the compression's)
    mem = [c for c in cap if not c.get("perplexity")] or cap
    rows = [cell_features(c) for c in mem]
    rss_coef, rss_pred = nnls_fit(rows, [c["peak_rss_mb"] - f["E"] / MIB for c, f in zip(mem, rows)], ["one", "W", "A"])
    rss_res = [{"cell": c["cell"], "measured": c["peak_rss_mb"], "fitted": round(p + f["E"] / MIB, 1), "rel_err": round((p + f["E"] / MIB - c["peak_rss_mb"]) / c["peak_rss_mb"], 3)}
               for c, p, f in zip(mem, rss_pred, rows)]
    host_gpu = lambda f: f["E"] / MIB + rss_coef["one"] + rss_coef["A"] * f["A"]  # noqa: E731
    host_gpu_extra = sum(c["peak_rss_mb"] - host_gpu(cell_features(c)) for c in gpu) / len(gpu) if gpu else 0.0
    # iterations for the targets: real-weight cells that were not capped, else the measured SmolLM2 range
    real_its = [it for c in cap if not c["arch"]["synthetic"] and not c.get("rpca_max_iter") for it in (c.get("rpca_iterations") or [])]
    iters = a.iters or (round(sum(real_its) / len(real_its)) if real_its else DEFAULT_ITERS)
    iters_src = "--iters" if a.iters else ("mean over the real-model cells" if real_its else "33–39 measured on SmolLM2 weights (capllm.decompose.rpca)")
    # GPU speed-ups per stage
    cpu_probe = probe("cpu", 1024, 0, [], 1)  # this CPU's fp32 matmul rate, measured now
    a_R = fits["cap"]["stage1_rpca"]["coef"]["R"]
    cpu_rpca_flops = RPCA_FLOPS_PER_R / a_R if a_R > 0 else float("inf")  # this CPU's effective rate inside Robust PCA (fitted)
    gprobe = json.loads(Path(a.gpu_probe).read_text()) if a.gpu_probe and Path(a.gpu_probe).exists() else None
    rho, rho_src = {}, {}
    for st in CAP_STAGES:
        if gpu and (cpu_t := sum(apply(fits["cap"], cell_features(c))[st] for c in gpu)) > 0 and (g_t := sum(stage_seconds(c)[st] for c in gpu)) > 0:
            rho[st], rho_src[st] = cpu_t / g_t, f"measured: CPU-fitted ÷ GPU-measured over {len(gpu)} GPU cell(s)"
        elif st in HOST_STAGES:
            rho[st], rho_src[st] = 1.0, "host-side stage: this CPU's time kept"
        elif st == "stage1_rpca" and gprobe and gprobe.get("rpca_iter_s"):
            r = [a_R * min(m, k) ** 2 * (m + k) / t for mk, t in gprobe["rpca_iter_s"].items() for m, k in [map(int, mk.split("x"))]]
            rho[st], rho_src[st] = sum(r) / len(r), f"GPU probe: RPCA s/iteration on {', '.join(gprobe['rpca_iter_s'])} vs the CPU fit"
        elif st == "stage1_rpca":
            g = gprobe["eigh64_flops"] if gprobe else ASSUMED_GPU["eigh64_flops"]
            rho[st], rho_src[st] = g / cpu_rpca_flops, ("GPU probe eigh64" if gprobe else "ASSUMED") + f" ÷ fitted CPU RPCA rate ({RPCA_FLOPS_PER_R}·R flops)"
        else:
            g = gprobe["matmul_bfloat16_flops"] if gprobe else ASSUMED_GPU["matmul_flops"]
            rho[st], rho_src[st] = g / cpu_probe["matmul_float32_flops"], ("GPU probe bf16 matmul" if gprobe else "ASSUMED bf16 matmul") + " ÷ CPU probe fp32 matmul"
    k_gpu, k_src = 1.0, "structural estimate (k = 1, not measured)"
    if gpu:
        ks = [c["peak_cuda_mb"] * MIB / gpu_struct_bytes(SHAPES[c["arch"]["shape"]], [tuple(x) for x in c["linears"][:7]], c["calibration"]["seqlen"])
              for c in gpu if c["arch"].get("shape") in SHAPES and c.get("peak_cuda_mb")]
        if ks:
            k_gpu, k_src = sum(ks) / len(ks), f"calibrated on {len(ks)} GPU cell(s): measured ÷ structural"
    from capllm.workdir import disk_estimate

    preds = {}
    for tname in TARGETS:
        s = SHAPES[tname]
        f = target_features(tname, a.nsamples * a.seqlen, iters)
        cpu_t = apply(fits["cap"], f)
        gpu_t = {st: v / rho[st] for st, v in cpu_t.items()}
        disk = disk_estimate(meta_model(s, s.layers), "cap", a.nsamples, a.seqlen, "compressed", False)
        preds[tname] = {"params": shape_params(s, s.layers), "checkpoint_gib": f["B"] / GIB, "cpu_s": cpu_t, "gpu_s": gpu_t,
                        "cpu_total_s": sum(cpu_t.values()), "gpu_total_s": sum(gpu_t.values()),
                        "cpu_rss_gib": (f["E"] / MIB + rss_coef["one"] + rss_coef["W"] * f["W"] + rss_coef["A"] * f["A"]) / 1024,
                        "gpu_host_rss_gib": (host_gpu(f) + host_gpu_extra) / 1024,
                        "gpu_peak_gib": k_gpu * gpu_struct_bytes(s, block_linears(s), a.seqlen) / GIB, "disk": disk, "disk_gib": disk["total"] / GIB}
        for m in fits:
            if m != "cap":
                preds[tname][f"{m}_cpu_total_s"] = sum(apply(fits[m], f).values())
    out = {"cells": [c["cell"] for c in cells], "fits": fits, "rss": {"coef": rss_coef, "residuals": rss_res, "gpu_host_extra_mb": host_gpu_extra},
           "gpu_memory": {"k": k_gpu, "source": k_src}, "rho": rho, "rho_source": rho_src, "cpu_probe": cpu_probe, "cpu_rpca_flops": cpu_rpca_flops, "gpu_probe": gprobe,
           "assumed_gpu": None if (gpu or gprobe) else ASSUMED_GPU, "iterations": {"value": iters, "source": iters_src},
           "target_calibration": {"nsamples": a.nsamples, "seqlen": a.seqlen}, "predictions": preds, "command": "python " + " ".join(sys.argv)}
    (d / "fit.json").write_text(json.dumps(out, indent=1) + "\n")
    md = report(out, cells)
    (d / "scale.md").write_text(md)
    plot_rss(cells, d / "peak_rss_vs_checkpoint.png")
    print(md)


def report(o: dict, cells: list[dict]) -> str:
    hrs = lambda s: f"{s / 86400:.1f} d" if s >= 2 * 86400 else f"{s / 3600:.1f} h" if s >= 3600 else f"{s:.0f} s"  # noqa: E731
    L = ["## Measured cells", "", "| cell | device | blocks | T | checkpoint GiB | total s | stage1 s (rpca) | fisher s | refit s | peak RSS GiB | peak GPU GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        t, f = c["time_s"], cell_features(c)
        L.append(f"| {c['cell']} | {c['device']} | {c['arch']['blocks']} | {c['calibration']['tokens']} | {f['B'] / GIB:.2f} | {t['total']:.1f} | "
                 f"{t.get('stage1', 0):.1f} ({t.get('stage1_rpca', 0):.1f}) | {t.get('fisher', 0):.1f} | {t.get('refit', 0):.1f} | {c['peak_rss_mb'] / 1024:.2f} | "
                 f"{(c.get('peak_cuda_mb') or 0) / 1024:.2f} |")
    L += ["", "## Fitted models (non-negative least squares on CPU cells)", "", "| method | stage | model | max abs rel. error |", "|---|---|---|---|"]
    for m, fit in o["fits"].items():
        for st, v in fit.items():
            errs = [abs(r["rel_err"]) for r in v["residuals"] if r["rel_err"] is not None]
            L.append(f"| {m} | {st} | {' + '.join(f'{c:.3g}·{k}' for k, c in v['coef'].items())} | {max(errs) if errs else 0:.0%} |")
    r = o["rss"]
    errs = [abs(x["rel_err"]) for x in r["residuals"]]
    L.append(f"| cap | peak RSS MiB | E/MiB (weights outside the blocks) + {' + '.join(f'{c:.3g}·{k}' for k, c in r['coef'].items())} | {max(errs):.0%} |")
    it, tc = o["iterations"], o["target_calibration"]
    L += ["", f"## Predictions: CAP at 50 %, {tc['nsamples']}×{tc['seqlen']} calibration tokens, {it['value']} RPCA iterations/matrix ({it['source']}), bf16 checkpoints", "",
          "| model | params | checkpoint GiB | 2-core CPU: wall | CPU peak RSS GiB | 1 GPU (80 GB): wall | GPU host RSS GiB | peak GPU GiB | disk GiB (work + saved) |", "|---|---|---|---|---|---|---|---|---|"]
    for n, p in o["predictions"].items():
        L.append(f"| {n} | {p['params'] / 1e9:.2f} B | {p['checkpoint_gib']:.1f} | {hrs(p['cpu_total_s'])} | {p['cpu_rss_gib']:.1f} | {hrs(p['gpu_total_s'])} | "
                 f"{p['gpu_host_rss_gib']:.1f} | {p['gpu_peak_gib']:.1f} | {p['disk_gib']:.0f} |")
    L += ["", "| stage | GPU speed-up ρ | source | " + " | ".join(f"{n} CPU / GPU" for n in o["predictions"]) + " |", "|---|---|---|" + "---|" * len(o["predictions"])]
    for st in CAP_STAGES:
        L.append(f"| {st} | {o['rho'][st]:.3g}× | {o['rho_source'][st]} | " + " | ".join(f"{hrs(p['cpu_s'][st])} / {hrs(p['gpu_s'][st])}" for p in o["predictions"].values()) + " |")
    cp = o["cpu_probe"]
    L += ["", f"CPU probe (this machine, {cp['threads']} threads, now): fp32 matmul {cp['matmul_float32_flops'] / 1e9:.1f} GFLOP/s; "
          f"fitted Robust-PCA rate {o['cpu_rpca_flops'] / 1e9:.2f} GFLOP/s ({RPCA_FLOPS_PER_R}·R flops).",
          f"Peak GPU memory: {o['gpu_memory']['source']} (k = {o['gpu_memory']['k']:.2f})."]
    if o["assumed_gpu"]:
        L.append(f"GPU speed: {o['assumed_gpu']['why']}.")
    return "\n".join(L) + "\n"


def plot_rss(cells: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real = [c for c in cells if not c["arch"]["synthetic"] and c["device"] == "cpu"]
    show = real or [c for c in cells if c["device"] == "cpu"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m in sorted({c["method"] for c in show}):
        pts = [(cell_features(c)["B"] / GIB, c["peak_rss_mb"] / 1024) for c in show if c["method"] == m]
        ax.scatter(*zip(*pts), label=m)
    xmax = max(cell_features(c)["B"] / GIB for c in show) * 1.1
    ax.plot([0, xmax], [2, xmax + 2], "k--", lw=1, label="y = x + 2 GiB")
    ax.set(xlabel="checkpoint size in memory (GiB)", ylabel="peak RSS (GiB)",
           title="peak host memory vs checkpoint" + ("" if real else " (synthetic cells only)"))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model", help="a random-weight LLaMA checkpoint with a real model's shapes and K blocks")
    m.add_argument("--shape", required=True, choices=sorted(SHAPES))
    m.add_argument("--blocks", type=int, default=2)
    m.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    m.add_argument("--out", required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--init-device", default="auto", help="where the weights are drawn (auto: cuda when present)")
    f = sub.add_parser("fits", help="print the most blocks of a shape whose checkpoint + CAP work dir fit the free disk")
    f.add_argument("--shape", required=True, choices=sorted(SHAPES))
    f.add_argument("--max", type=int, default=32)
    f.add_argument("--dir", default=".")
    f.add_argument("--nsamples", type=int, default=8)
    f.add_argument("--seqlen", type=int, default=512)
    f.add_argument("--fraction", type=float, default=0.85, help="of the free space to use")
    ms = sub.add_parser("measure", help="one capllm compress process per (model, method)")
    ms.add_argument("--models", required=True, help="comma-separated: shape:NAME[:BLOCKS], an alias or a model directory")
    ms.add_argument("--methods", default="cap,sparsegpt,wanda")
    ms.add_argument("--out", default=str(RESULTS))
    ms.add_argument("--ratio", type=float, default=0.5)
    ms.add_argument("--calib", default="enwiki", help="enwiki (needs CAPLLM_DATA_DIR), a text file, or 'corpus' (the model dir's corpus.txt)")
    ms.add_argument("--nsamples", type=int, default=8)
    ms.add_argument("--seqlen", type=int, default=512)
    ms.add_argument("--device", default="cpu")
    ms.add_argument("--dtype", default="auto", help="compute dtype (auto: float32 on a CPU, bfloat16 on a GPU)")
    ms.add_argument("--model-dtype", default="bfloat16", help="stored dtype of shape: models")
    ms.add_argument("--rpca-max-iter", type=int, default=0, help="cap Stage 1 iterations (0: capllm's default, to convergence)")
    ms.add_argument("--option", action="append", default=[], help="extra --option KEY=VALUE for every cell")
    ms.add_argument("--save", default="none", choices=["none", "compressed", "dense"])
    ms.add_argument("--eval", action="store_true", help="real models: evaluate perplexity too")
    ms.add_argument("--timeout", type=float, default=0, help="seconds per cell (0: none)")
    ms.add_argument("--deadline", type=float, default=0, help="Unix time after which no cell runs on (a timed-out cell is killed and recorded)")
    ms.add_argument("--keep", action="store_true", help="keep each cell's run directory")
    ms.add_argument("--models-dir", default=None, help="where shape: models are built (default $CAPLLM_CACHE/scale-models)")
    ms.add_argument("--work", default=None, help="run directories (default $CAPLLM_CACHE/scale-work)")
    pr = sub.add_parser("probe", help="matmul / eigh throughput and Robust-PCA seconds per iteration on a device")
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--n", type=int, default=1024)
    pr.add_argument("--eigh-n", type=int, default=512)
    pr.add_argument("--rpca-shapes", default="", help="e.g. 4096x4096,14336x4096")
    pr.add_argument("--rpca-iters", type=int, default=4)
    pr.add_argument("--out", default=str(RESULTS / "probe-cpu.json"))
    su = sub.add_parser("summary", help="one screen of per-stage seconds and peak memory of the cells in a folder")
    su.add_argument("--dir", default=str(RESULTS))
    ft = sub.add_parser("fit", help="fit the cost models and predict Llama-3-8B / 70B")
    ft.add_argument("--results", default=str(RESULTS))
    ft.add_argument("--gpu-results", default=None, help="a folder of GPU cells (gpu_scale.sh's $OUT/cells)")
    ft.add_argument("--gpu-probe", default=None, help="a GPU probe JSON (gpu_scale.sh's $OUT/probe-cuda.json)")
    ft.add_argument("--nsamples", type=int, default=32, help="calibration windows of the predicted runs (capllm's default)")
    ft.add_argument("--seqlen", type=int, default=512)
    ft.add_argument("--iters", type=int, default=0, help="RPCA iterations per matrix for the predictions (0: from the cells)")
    a = p.parse_args()
    if a.cmd == "measure":
        from capllm.utils import cache_dir

        a.models_dir = a.models_dir or str(cache_dir() / "scale-models")
        a.work = a.work or str(cache_dir() / "scale-work")
    {"make-model": cmd_make_model, "fits": cmd_fits, "measure": cmd_measure, "probe": cmd_probe, "fit": cmd_fit, "summary": cmd_summary}[a.cmd](a)


if __name__ == "__main__":
    main()
