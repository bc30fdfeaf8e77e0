"""The compress job end to end: load, evaluate dense, compress, evaluate, write result.json.

``compress(model, tokenizer, cfg)`` is the library entry point (compresses in place and returns
the result dict); ``run_compress_job`` is what ``capllm compress`` does around it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
import tempfile
import time
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from capllm.data.calibration import CalibrationConfig, load_calibration
from capllm.data.sources import load_text
from capllm.engine.context import CompressionContext
from capllm.engine.distributed import SINGLE, Dist
from capllm.errors import CapllmError
from capllm.eval.perplexity import PerplexityConfig, evaluate_perplexity
from capllm.methods.base import Structure, get_method
from capllm.models.layers import count_params
from capllm.models.loader import DEFAULT_MODEL, load_model
from capllm.results import capllm_version, environment, params_block
from capllm.utils import (StageTimer, TimerHeartbeat, atomic_dir, cache_dir, json_cache_get, json_cache_put, peak_cuda_mb, peak_rss_mb, resolve_device,
                          resumed_times, write_json_atomic)

DEFAULT_METHOD = "cap"  # measured: beats sparsegpt, wanda, magnitude and cap-uniform at 50 % (BENCHMARKS.md)
SAVE_MODES = ("compressed", "dense", "none")
TIMER_FILE = "timer.json"  # the heartbeat of the time spent (in the work directory)


@dataclass(frozen=True)
class CompressConfig:
    method: str = DEFAULT_METHOD
    ratio: float = 0.5
    structure: str | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    device: str = "auto"
    options: tuple[tuple[str, Any], ...] = ()
    progress: bool = True
    dtype: str = "auto"  # compute dtype of each block: auto = float32 on a CPU, bfloat16 on a GPU
    work_dir: str | None = None  # per-model state of the run (resumable); None = a temporary directory


COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in COMPUTE_DTYPES:
        raise CapllmError(f"--dtype {name!r}: use auto, {', '.join(COMPUTE_DTYPES)}")
    if device.type == "cpu" and name != "float32":
        print(f"capllm: warning: --dtype {name} on a CPU is many times slower than float32", file=sys.stderr)
    return COMPUTE_DTYPES[name]


def build_method(cfg: CompressConfig):
    """Validate the method, ratio, structure and options before any expensive work."""
    cls = get_method(cfg.method)
    structure = Structure.parse(cfg.structure)
    ratio = cfg.ratio
    if not cls.uses_ratio:
        ratio = 0.0
    return cls(ratio, structure, dict(cfg.options))


def check_weights_finite(model) -> None:
    """Every weight finite; each one's read-only checkpoint pages are given back once checked
    (reading the whole model would otherwise leave all of it resident before the first block)."""
    from capllm.utils import release_host_pages

    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise CapllmError(f"the model's weight {name} contains NaN or Inf: the checkpoint is corrupt")
        release_host_pages([p.data], clean_only=True)


def check_distributable(method, dist: Dist) -> None:
    """Several processes run the layer-wise engine's methods and the CAP family (``distributed``)."""
    from capllm.methods.base import Method

    if dist.enabled and type(method).compress_model is not Method.compress_model and not getattr(method, "distributed", False):
        raise CapllmError(f"method {method.name} cannot run on several processes yet (layer-wise methods can): run it without torchrun")


def compress(model, tokenizer, cfg: CompressConfig = CompressConfig(), timer: StageTimer | None = None, dist: Dist = SINGLE) -> dict[str, Any]:
    """Compress ``model`` in place; return the result.json fields this step knows.

    ``dist``: the process group to divide the work over (:mod:`capllm.engine.distributed`);
    every rank calls this with the same arguments and ends with the same model."""
    timer = timer or StageTimer()
    method = build_method(cfg)
    check_distributable(method, dist)
    device = resolve_device(cfg.device)
    check_weights_finite(model)
    whole_dense = count_params(model)
    calib = None
    if method.needs_calibration:
        with timer.stage("calibration_data"):
            calib = load_calibration(tokenizer, cfg.calibration, held_out=int(getattr(method, "held_out_windows", 0)))
    dtype = compute_dtype(cfg.dtype, device)
    with contextlib.ExitStack() as stack:
        work = cfg.work_dir
        if work is None:  # a library call: per-model state in a temporary directory (rank 0's, shared)
            if dist.is_main:
                root = cache_dir() / "work"
                root.mkdir(parents=True, exist_ok=True)
                work = stack.enter_context(tempfile.TemporaryDirectory(prefix="run-", dir=root))
            work = dist.broadcast_object(work, src=0)
        stack.callback(dist.barrier)  # no rank leaves (and rank 0 removes the directory) before all are done
        ctx = CompressionContext(model, calib, device, progress=cfg.progress and dist.is_main, timer=timer, compute_dtype=dtype, work_dir=work, dist=dist)
        dense_linear = ctx.dense_linear_params
        with timer.stage("compress"):
            method.compress_model(ctx)
    missing = [h.name for h in ctx.linears if h.name not in ctx.records]
    if missing:
        raise RuntimeError(f"method {method.name} left {len(missing)} linear layers unrecorded, e.g. {missing[0]}")
    kept_linear = sum(r.kept_params for r in ctx.records.values())
    return {
        "capllm_version": capllm_version(),
        "method": method.name,
        "method_options": method.describe()["options"],
        "ratio": method.ratio,
        "structure": str(method.structure) if method.structure else None,
        "model": getattr(model, "_capllm_source", {"name": type(model).__name__, "revision_or_path": "in-memory"}),
        "params": params_block(dense_linear, kept_linear, whole_dense),
        "calibration": calib.describe() if calib else None,
        "device": str(device),
        "distributed": dist.describe(),
        "compute_dtype": str(dtype).replace("torch.", ""),
        "stored_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "layers": [ctx.records[h.name].as_dict() for h in ctx.linears],
        **({"method_results": ctx.extra} if ctx.extra else {}),
    }


# --- dense perplexity cache -------------------------------------------------------------------


def _ppl_cache_key(model_source: dict, source, pcfg: PerplexityConfig, seqlen: int | None) -> str:
    text_hash = hashlib.sha256(source.text.encode("utf-8")).hexdigest()[:16]
    key = json.dumps([model_source, source.name, source.split, source.origin, text_hash, seqlen, pcfg.max_windows, capllm_version()], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def dense_perplexity(model, tokenizer, pcfg: PerplexityConfig, device, progress: bool, source, use_cache: bool = True, dist: Dist = SINGLE) -> dict:
    """Evaluate the unmodified model, reusing a cached figure for the same model and protocol."""
    path = cache_dir() / "dense-perplexity.json"
    msrc = getattr(model, "_capllm_source", None)
    key = _ppl_cache_key(msrc, source, pcfg, pcfg.seqlen) if (msrc and use_cache) else None
    hit = dist.broadcast_object(json_cache_get(path, key) if dist.is_main else None, src=0)  # one decision for all ranks
    if hit is not None:
        return {**hit, "cached": True}
    res = evaluate_perplexity(model, tokenizer, pcfg, device=device, progress=progress, source=source, dist=dist)
    if dist.is_main:
        json_cache_put(path, key, res)
    return res


# --- the CLI job ------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobConfig:
    model: str = DEFAULT_MODEL
    compress: CompressConfig = field(default_factory=CompressConfig)
    evaluate: bool = True
    eval: PerplexityConfig = field(default_factory=lambda: PerplexityConfig(max_windows=16))
    out: str | None = None
    dense_cache: bool = True
    save: str = "compressed"  # what goes next to result.json: compressed | dense | none
    zeroshot: Any = None  # capllm.eval.zeroshot.ZeroShotConfig: zero-shot of the compressed model (in memory)
    generation: Any = None  # capllm.eval.generation.GenerationConfig: long-form check against the dense model
    plot: bool = False  # write allocation.png (methods that report an allocation)
    arguments: dict | None = None  # the CLI arguments, kept in the work directory for --resume (not compared)


def default_out_dir(model: str, method: str, ratio: float) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe = Path(model).name.replace("/", "_") or "model"
    return Path("runs") / f"{stamp}-{safe}-{method}-{ratio:g}"


def job_fingerprint(job: JobConfig) -> dict:
    """What must match for a work directory to be resumed (not progress bars, not --out)."""
    from capllm.models.loader import resolve_model_source

    comp = {k: v for k, v in asdict(job.compress).items() if k not in ("progress", "work_dir")}
    return json.loads(json.dumps({"model": resolve_model_source(job.model), "compress": comp, "evaluate": job.evaluate,
                                  "eval": asdict(job.eval) if job.evaluate else None, "save": job.save, "capllm_version": capllm_version()}, default=str))


def run_compress_job(job: JobConfig, log=print, dist: Dist = SINGLE) -> dict[str, Any]:
    """``capllm compress``. With several processes (``torchrun``) every rank runs this; rank 0
    alone writes the work directory's state, logs, and writes ``--out``."""
    from capllm.workdir import check_disk, disk_estimate, open_work_dir, remove_work_dir, save_state, work_dir_for

    if not dist.is_main:
        log = lambda *a, **k: None  # noqa: E731
        job = dataclasses.replace(job, compress=dataclasses.replace(job.compress, progress=False))
        save_state = lambda *a, **k: None  # noqa: E731,F811
    method = build_method(job.compress)  # fail fast on bad method / ratio / options
    check_distributable(method, dist)
    if dist.enabled:  # every rank must run the same job
        mine = hashlib.sha256(json.dumps(job_fingerprint(job), sort_keys=True).encode()).hexdigest()
        all_ = dist.all_gather_object(mine)
        if len(set(all_)) > 1:
            odd = [r for r, h in enumerate(all_) if h != all_[0]]
            if not dist.is_main:  # let rank 0 print its line first: torchrun kills the other ranks as soon as one exits
                time.sleep(2.0)
            raise CapllmError(f"the job's configuration differs between ranks (rank {odd[0]} differs from rank 0): start every rank with the same arguments")
    if job.save not in SAVE_MODES:
        raise CapllmError(f"--save {job.save!r}: use one of {', '.join(SAVE_MODES)}")
    if job.zeroshot is not None:
        from capllm.eval.zeroshot import check_zeroshot

        check_zeroshot(job.zeroshot)
    out = Path(job.out) if job.out else default_out_dir(job.model, job.compress.method, job.compress.ratio)
    if out.exists():
        raise CapllmError(f"output directory {out} already exists: choose another --out or remove it")
    device = resolve_device(job.compress.device)
    if dist.enabled and device.type == "cuda":
        device = torch.device(f"cuda:{dist.local_rank}")  # every rank its own GPU
        job = dataclasses.replace(job, compress=dataclasses.replace(job.compress, device=str(device)))
    if dist.is_main:
        work, state = open_work_dir(work_dir_for(out), job_fingerprint(job), log, arguments=job.arguments)
    work, state = dist.broadcast_object((work, state) if dist.is_main else None, src=0)
    resumed = state is not None
    state = dict(state or {})
    state["attempts"] = state.get("attempts", 0) + 1
    # the time spent so far lives only in the heartbeat file (every 30 s, running stages included), so
    # an attempt killed anywhere still counts when the resume adds it up; a state's own "time_s" is
    # read only from work directories of earlier versions
    timer = StageTimer(previous=resumed_times(state.get("time_s"), work / TIMER_FILE))
    with TimerHeartbeat(timer, work / TIMER_FILE) if dist.is_main else contextlib.nullcontext():
        with timer.stage("load_model"):
            model, tokenizer = load_model(job.model)
        if not resumed and dist.is_main:
            need = disk_estimate(model, method.name, job.compress.calibration.nsamples, job.compress.calibration.seqlen, job.save, stage1_cached=False,
                                 entry_fisher=getattr(method.options, "entry_score", "") == "diag")
            state["disk_estimate_bytes"] = need
            try:
                check_disk(work, need["total"])
            except CapllmError:
                remove_work_dir(work)
                raise
        save_state(work, state)
        eval_source = None
        dense_ppl = None
        if job.evaluate:
            with timer.stage("eval_data"):
                eval_source = load_text(job.eval.dataset, job.eval.split, job.eval.data_dir, purpose="eval")
            if method.uses_ratio:  # the dense reference (the `dense` method is scored once, below)
                if state.get("perplexity_dense") is not None:
                    dense_ppl = state["perplexity_dense"]
                else:
                    with timer.stage("eval_dense"):
                        dense_ppl = dense_perplexity(model, tokenizer, job.eval, device, job.compress.progress, eval_source, job.dense_cache, dist=dist)
                    state["perplexity_dense"] = dense_ppl
                    save_state(work, state)
                log(f"capllm: dense perplexity {dense_ppl['value']:.3f} on {eval_source.name}:{eval_source.split} ({dense_ppl['windows']} of {dense_ppl['windows_available']} windows × {dense_ppl['seqlen']} tokens){' [cached]' if dense_ppl.get('cached') else ''}")
        gen_prompts = gen_ref = None
        if job.generation is not None:  # the dense model's continuations, before it is compressed
            from capllm.eval.generation import dense_reference, make_prompts

            gen_source = eval_source or load_text(job.eval.dataset, job.eval.split, job.eval.data_dir, purpose="eval")
            gen_prompts = make_prompts(tokenizer, gen_source.text, job.generation)
            with timer.stage("generation_dense"):
                gen_ref = dense_reference(model, gen_prompts, job.generation, device, job.dense_cache)
        result = compress(model, tokenizer, dataclasses.replace(job.compress, work_dir=str(work / "compress")), timer, dist=dist)
        ppl = None
        if job.evaluate:
            with timer.stage("eval"):
                ppl = evaluate_perplexity(model, tokenizer, job.eval, device=device, progress=job.compress.progress, source=eval_source, dist=dist)
            if not math.isfinite(ppl["value"]):
                raise CapllmError("compressed model perplexity is not finite")
            if dense_ppl is None:
                dense_ppl = ppl
        result["peak_rss_mb_compress"] = round(peak_rss_mb(), 1)  # before the extra evaluations below
        if dist.enabled:
            if job.zeroshot is not None or job.generation is not None:
                raise CapllmError("zero-shot and generation checks run in one process: run them with `capllm eval` on the saved model")
            result["peak_rss_mb_by_rank"] = dist.all_gather_object(round(peak_rss_mb(), 1))
            if not dist.is_main:  # rank 0 writes the outputs
                dist.barrier()
                return result
        if job.zeroshot is not None:
            from capllm.eval.zeroshot import evaluate_zeroshot, zeroshot_table

            z = job.zeroshot
            with timer.stage("zeroshot"):
                result["zeroshot"] = evaluate_zeroshot(model, tokenizer, z.tasks, z.limit, z.seed, z.batch_size, device, z.source, z.include_path, job.compress.progress)
            log(zeroshot_table(result["zeroshot"]))
        if job.generation is not None:
            from capllm.eval.generation import generation_check

            with timer.stage("generation"):
                result["generation"] = generation_check(model, tokenizer, gen_prompts, gen_ref, lambda: load_model(job.model)[0], job.generation, device,
                                                        source={"dataset": gen_source.name, "split": gen_source.split, "origin": gen_source.origin})
        result.update({
            "perplexity": ppl,
            "perplexity_dense": dense_ppl,
            "time_s": timer.as_dict(),
            "peak_by_stage": timer.peaks(),
            "attempts": state["attempts"],  # > 1: resumed after an interruption (time_s adds up the attempts)
            "disk_estimate_bytes": state.get("disk_estimate_bytes"),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_cuda_mb": peak_cuda_mb(device),
            "environment": environment(),
            "eval_config": asdict(job.eval) if job.evaluate else None,
            "out_dir": str(out),
        })
        with atomic_dir(out) as tmp:
            if job.save != "none":  # the model itself, next to result.json; its bytes on disk go into result.json
                from capllm.format import write_compressed, write_dense

                with timer.stage("save"):
                    written = write_compressed(model, tmp, tokenizer, result) if job.save == "compressed" else write_dense(model, tmp, tokenizer)
                result["storage"] = {"format": job.save, **written}
                result["time_s"] = timer.as_dict()
            write_json_atomic(tmp / "result.json", result)
            alloc = result.get("method_results", {}).get("allocation")
            if job.plot and alloc:
                from capllm.allocate.plot import plot_allocation

                plot_allocation(alloc, tmp / "allocation.png", f"{result['method']} {result['ratio']:.0%} — {result['model']['name']}")
            elif job.plot:
                log(f"capllm: --plot: method {result['method']} reports no per-matrix allocation; no plot written")
    remove_work_dir(work)
    dist.barrier()
    return result
