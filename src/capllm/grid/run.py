"""The benchmark grid runner: every (model, method, ratio) cell, resumably, then one report.

Each cell is its own ``capllm compress`` process (so peak memory is that cell's own) writing
``DIR/cells/<cell>/`` through the compress job's atomic output directory: a cell either has a
complete ``result.json`` or does not exist. ``run_grid`` therefore

* skips a cell whose ``result.json`` parses (a finished cell is never recomputed);
* recomputes a cell whose directory lacks a readable ``result.json`` (removed first), and removes
  the temporary directories a killed cell left behind (``.<cell>.tmp-*``);
* holds ``DIR/.bench.lock`` so two grids never write the same directory at once, and, with
  ``cell_lock``, takes that lock file around each cell (the workplace's shared heavy-job lock:
  other jobs interleave between cells);
* keeps going when a cell fails (its log is ``DIR/logs/<cell>.log``) and reports the failures.

Zero-shot and the generation check run inside each cell on the in-memory compressed model
(``capllm compress --tasks ... --gen-prompts ...``), so nothing is saved and reloaded for them.
:func:`capllm.grid.report.write_report` builds ``DIR/report.md`` and the plots from whatever
cells are finished (read through :mod:`capllm.grid.cells`).
"""

from __future__ import annotations

import fcntl
import json
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from capllm.errors import CapllmError
from capllm.grid.cells import read_result
from capllm.grid.report import write_report


@dataclass(frozen=True)
class Cell:
    model: str
    method: str
    ratio: float | None  # None: the method takes no ratio (dense)

    @property
    def name(self) -> str:
        safe = Path(self.model).name.replace("/", "_") or "model"
        return f"{safe}__{self.method}" + ("" if self.ratio is None else f"-{self.ratio:g}")


@dataclass(frozen=True)
class BenchConfig:
    models: tuple[str, ...]
    methods: tuple[str, ...]
    ratios: tuple[float, ...]
    out: str
    compress_args: tuple[str, ...] = ()  # passed to every `capllm compress` (protocol, --tasks, --gen-prompts, ...)
    cell_lock: str | None = None
    python: str = field(default_factory=lambda: sys.executable)
    nproc: int = 1  # > 1: every cell runs on that many processes (torchrun --standalone)


def plan(cfg: BenchConfig) -> list[Cell]:
    """The cells of the grid, in order (validates method names and ratios before any work)."""
    from capllm.methods.base import get_method

    if not cfg.models or not cfg.methods:
        raise CapllmError("bench needs at least one --models and one --methods entry")
    for r in cfg.ratios:
        if not 0.0 < r < 1.0:
            raise CapllmError(f"ratio {r:g} is outside (0, 1)")
    cells: list[Cell] = []
    for model in cfg.models:
        for method in cfg.methods:
            if get_method(method).uses_ratio:
                if not cfg.ratios:
                    raise CapllmError(f"method {method} needs --ratios")
                cells += [Cell(model, method, r) for r in cfg.ratios]
            else:
                cells.append(Cell(model, method, None))
    return cells


def cell_command(cfg: BenchConfig, cell: Cell, out: Path) -> list[str]:
    launch = [cfg.python] + (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(cfg.nproc)] if cfg.nproc > 1 else [])
    cmd = launch + ["-m", "capllm", "compress", "--model", cell.model, "--method", cell.method, "--out", str(out), "--quiet"]
    if cell.ratio is not None:
        cmd += ["--ratio", f"{cell.ratio:g}"]
    return cmd + list(cfg.compress_args)


@contextmanager
def file_lock(path: Path, blocking: bool = True) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            raise CapllmError(f"another capllm bench holds {path}: wait for it or use another --out") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _clean_cell(cells_dir: Path, cell: Cell) -> None:
    for tmp in cells_dir.glob(f".{cell.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    d = cells_dir / cell.name
    if d.exists() and read_result(d) is None:
        shutil.rmtree(d)


def run_cell(cfg: BenchConfig, cell: Cell, log=print) -> str:
    """Run one cell unless finished; returns ``"done"``, ``"skipped"`` or ``"failed"``."""
    root = Path(cfg.out)
    cells_dir, logs = root / "cells", root / "logs"
    if read_result(cells_dir / cell.name) is not None:
        log(f"[skip] {cell.name}: finished")
        return "skipped"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = cell_command(cfg, cell, cells_dir / cell.name)
    lock = file_lock(Path(cfg.cell_lock)) if cfg.cell_lock else _nullcontext()
    with lock:
        _clean_cell(cells_dir, cell)
        log(f"[run]  {cell.name}: {shlex.join(cmd)}")
        t0 = time.time()
        with open(logs / f"{cell.name}.log", "a") as fh:  # a resumed cell keeps the log of its earlier attempts
            fh.write(f"$ {shlex.join(cmd)}\n")
            fh.flush()
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or read_result(cells_dir / cell.name) is None:
        tail = (logs / f"{cell.name}.log").read_text().strip().splitlines()[-1:] or [""]
        log(f"[fail] {cell.name}: exit {proc.returncode} after {time.time() - t0:.0f} s ({tail[0][:160]}); log {logs / (cell.name + '.log')}")
        return "failed"
    log(f"[done] {cell.name}: {time.time() - t0:.0f} s")
    return "done"


@contextmanager
def _nullcontext() -> Iterator[None]:
    yield


def run_grid(cfg: BenchConfig, log=print, peers: list[dict] | None = None) -> dict[str, list[str]]:
    cells = plan(cfg)
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    status: dict[str, list[str]] = {"done": [], "skipped": [], "failed": []}
    with file_lock(root / ".bench.lock", blocking=False):
        prev = root / "bench.json"
        if prev.exists():
            try:
                old = json.loads(prev.read_text()).get("compress_args")
            except json.JSONDecodeError:
                old = None
            if old is not None and list(old) != list(cfg.compress_args):
                log(f"[warn] {root} was started with other cell arguments ({shlex.join(old)}); finished cells keep theirs")
        _write_json(root / "bench.json", {**asdict(cfg), "cells": [c.name for c in cells],
                                          "commands": {c.name: shlex.join(cell_command(cfg, c, root / "cells" / c.name)) for c in cells}})
        for cell in cells:
            status[run_cell(cfg, cell, log)].append(cell.name)
        write_report(root, [c.name for c in cells], peers)
    return status


def _write_json(path: Path, obj) -> None:
    from capllm.utils import write_json_atomic

    write_json_atomic(path, obj)
