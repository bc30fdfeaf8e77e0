"""The result.json contract and the end-of-run summary table.

Fields (later capabilities add fields, never rename these)::

    {"capllm_version", "method", "ratio", "structure", "model": {"name", "revision_or_path"},
     "params": {"dense_linear", "kept_linear", "whole_model_dense", "whole_model_kept"},
     "calibration": {"dataset", "nsamples", "seqlen", "seed"},
     "perplexity": {"dataset", "split", "seqlen", "windows", "tokens", "bos", "value"} | null,
     "time_s": {"<stage>": seconds, ..., "total"}, "peak_rss_mb", "device", "layers": [...]}
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch


def capllm_version() -> str:
    try:
        return version("capllm")
    except PackageNotFoundError:
        return "0+unknown"


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _ver("transformers"),
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "capllm_commit": source_commit(),
    }


def source_commit() -> str | None:
    """The git commit capllm runs from (``+dirty`` with uncommitted changes), when it runs from a checkout."""
    import subprocess
    from pathlib import Path

    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--", "."], capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _ver(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def params_block(dense_linear: int, kept_linear: int, whole_model_dense: int) -> dict[str, Any]:
    return {
        "dense_linear": dense_linear,
        "kept_linear": kept_linear,
        "kept_linear_fraction": round(kept_linear / dense_linear, 6) if dense_linear else None,
        "whole_model_dense": whole_model_dense,
        "whole_model_kept": whole_model_dense - dense_linear + kept_linear,
        "counted": "decoder-block linear layers only; embeddings, norms and LM head are not compressed",
    }


def _fmt_int(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def summary_table(result: dict[str, Any]) -> str:
    """A plain-text table of what the run achieved."""
    rows: list[tuple[str, str]] = []
    p = result["params"]
    rows.append(("method", f"{result['method']}" + (f" ({result['structure']})" if result.get("structure") else "")))
    rows.append(("model", result["model"]["name"]))
    rows.append(("target ratio", f"{result['ratio']:.0%} of decoder-linear parameters removed"))
    rows.append(("kept (decoder linears)", f"{_fmt_int(p['kept_linear'])} / {_fmt_int(p['dense_linear'])} ({p['kept_linear'] / p['dense_linear']:.2%})"))
    rows.append(("kept (whole model)", f"{_fmt_int(p['whole_model_kept'])} / {_fmt_int(p['whole_model_dense'])}"))
    cal = result.get("calibration")
    if cal:
        rows.append(("calibration", f"{cal['dataset']} {cal['nsamples']}×{cal['seqlen']} seed {cal['seed']}"))
    dense, comp = result.get("perplexity_dense"), result.get("perplexity")
    for label, block in (("perplexity (dense)", dense), ("perplexity (compressed)", comp)):
        if block:
            rows.append((label, f"{block['value']:.3f}  [{block['dataset']}:{block['split']}, {block['windows']}×{block['seqlen']} tok, {block['tokens']:,} predicted]" + (" (cached)" if block.get("cached") else "")))
    if dense and comp:
        rows.append(("perplexity ratio", f"{comp['value'] / dense['value']:.3f}× dense"))
    peaks = result.get("peak_by_stage") or {}
    rss, gpu = peaks.get("rss_mb", {}), peaks.get("gpu_mb", {})
    for stage, secs in result["time_s"].items():
        mem = ""
        if stage in rss:
            mem = f"   peak RSS so far {rss[stage]:,.0f} MiB" + (f", GPU {gpu[stage]:,.0f} MiB" if stage in gpu else "")
        rows.append((f"time: {stage}", f"{secs:.1f} s{mem}"))
    rows.append(("peak memory (RSS)", f"{result['peak_rss_mb']:.0f} MiB" + (f"; GPU {result['peak_cuda_mb']:.0f} MiB" if result.get("peak_cuda_mb") else "")))
    if result.get("attempts", 1) > 1:
        rows.append(("resumed", f"finished on attempt {result['attempts']} (times add up the attempts)"))
    if result.get("out_dir"):
        rows.append(("written to", result["out_dir"]))
    w = max(len(k) for k, _ in rows)
    line = "-" * (w + 2 + max(len(v) for _, v in rows))
    return "\n".join([line] + [f"{k.ljust(w)}  {v}" for k, v in rows] + [line])
