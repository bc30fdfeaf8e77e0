"""The work directory of a ``capllm compress`` run: what makes a killed run resumable.

``capllm compress --out DIR`` keeps everything per model that the run computes — the engine's
finished blocks and block inputs (:mod:`capllm.engine.checkpoint`), CAP's statistics, scores and
masks (:mod:`capllm.allocate.store`), the stages already finished and their timings — in
``DIR.work/`` beside the output. Started again with the same command (or ``--resume DIR``), the
run finds it, checks that the configuration is the same (``job.json``; a different one is a
one-line error, never a silent mix) and continues from the last finished block or stage; the
result is bit-identical to an uninterrupted run. On success the work directory is removed and
``DIR`` appears atomically.

:func:`disk_estimate` sizes the work directory (and the saved model) up front so that a disk
too small is one line before any work, not an error after an hour.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from capllm.errors import CapllmError
from capllm.utils import write_json_atomic

JOB = "job.json"


def work_dir_for(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".work")


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
            if d:
                return d
        return None
    return None if a == b else f"{path}: {a!r} there vs {b!r} now"


def open_work_dir(path: Path, fingerprint: dict, log=None, arguments: dict | None = None) -> tuple[Path, dict | None]:
    """Create ``path`` for a new run, or reopen it for a resume; returns ``(path, state)`` where
    ``state`` is what the interrupted run recorded (``None`` for a new run)."""
    path = Path(path)
    job = path / JOB
    if job.exists():
        try:
            old = json.loads(job.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CapllmError(f"{job} is unreadable ({exc}): remove {path} to start over") from exc
        diff = _first_difference(old.get("fingerprint"), json.loads(json.dumps(fingerprint, default=str)))
        if diff:
            raise CapllmError(f"{path} holds an interrupted run with a different configuration ({diff}): run the same command to resume it, or remove {path}")
        if log:
            log(f"capllm: resuming the interrupted run in {path}")
        return path, old.get("state") or {}
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(job, {"fingerprint": fingerprint, "arguments": arguments, "state": {}})
    return path, None


def save_state(path: Path, state: dict) -> None:
    """Record what a stage finished (e.g. the dense perplexity, stage timings) for a resume."""
    job = Path(path) / JOB
    data = json.loads(job.read_text())
    data["state"] = state
    write_json_atomic(job, data)


def remove_work_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def disk_estimate(model, method_name: str, nsamples: int, seqlen: int, save: str, stage1_cached: bool, entry_fisher: bool = False) -> dict[str, int]:
    """Bytes the run will write, by part (upper estimates; see the module docstring)."""
    from capllm.models.layers import find_decoder_blocks, find_linears

    linears = find_linears(model)
    params = sum(h.numel for h in linears)
    wbytes = next(model.parameters()).element_size()
    _, blocks = find_decoder_blocks(model)
    hidden = getattr(model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config, "hidden_size", None) or linears[0].shape[1]
    acts_block = nsamples * seqlen * hidden * 4
    est = {"block_inputs": 2 * acts_block}
    is_cap = method_name.startswith("cap") or method_name == "rpca-threshold"
    if method_name != "dense":
        est["finished_blocks"] = int(params * (wbytes + 1 / 8))  # values (stored dtype) + bit mask of every compressed linear
    if is_cap:
        if not stage1_cached:
            est["stage1_cache"] = int(params * 4 * 1.25)
        est["cap_inputs"] = (len(blocks) + 1) * acts_block
        est["cap_scores_and_masks"] = int(params * (4 + 1 / 8))  # fp32 key + bit mask per candidate (≤ one per weight)
        if entry_fisher:  # entry_score=diag: bf16 E[g² x²] per weight, until the scores are written
            est["cap_entry_fisher"] = int(params * 2)
    if save in ("compressed", "dense"):  # a compressed model is smaller than the dense one
        est["saved_model"] = sum(p.numel() for p in model.parameters()) * wbytes
    est["total"] = sum(est.values())
    return est


def check_disk(where: Path, need: int) -> None:
    where = Path(where)
    probe = where
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise CapllmError(f"this run needs about {need / 2**30:.1f} GiB of disk in {probe} and {free / 2**30:.1f} GiB are free: free space or choose another --out")
