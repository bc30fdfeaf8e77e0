"""``capllm bench``: every (model, method, ratio) cell, resumably, then report.md and plots.

Each cell runs ``capllm compress`` in its own process into ``OUT/cells/<cell>/``; a cell with a
``result.json`` is never recomputed, so an interrupted grid resumes where it stopped. Zero-shot
(``--tasks``) and the generation check (``--gen-prompts``) run inside each cell on the in-memory
compressed model. Arguments after ``--`` go to every ``capllm compress`` unchanged.
"""

from __future__ import annotations

import sys

from capllm.errors import CapllmError

HELP = "run a grid of models × methods × ratios resumably and write a report"


def add_parser(sub) -> None:
    from capllm.models.loader import DEFAULT_MODEL

    b = sub.add_parser("bench", help=HELP, description=__doc__)
    b.add_argument("--models", default=DEFAULT_MODEL, help=f"comma-separated models (default {DEFAULT_MODEL})")
    b.add_argument("--methods", default="dense,magnitude,wanda,sparsegpt,cap", help="comma-separated methods (default dense,magnitude,wanda,sparsegpt,cap)")
    b.add_argument("--ratios", default="0.5", help="comma-separated ratios for methods that take one (default 0.5)")
    b.add_argument("--out", required=True, help="grid directory (created; reused to resume)")
    b.add_argument("--tasks", default=None, help="zero-shot tasks for every cell (see `capllm eval --help`)")
    b.add_argument("--limit", type=int, default=None, help="documents per zero-shot task (seeded subsample)")
    b.add_argument("--data-dir", default=None, help="local dataset directory (default $CAPLLM_DATA_DIR)")
    b.add_argument("--dataset", default=None, help="perplexity text (default: capllm compress's default)")
    b.add_argument("--eval-seqlen", default=None, help="perplexity window length")
    b.add_argument("--max-windows", default=None, help="perplexity windows to score")
    b.add_argument("--calib", default=None, help="calibration text")
    b.add_argument("--nsamples", default=None)
    b.add_argument("--seqlen", default=None, help="calibration window length")
    b.add_argument("--seed", default=None, help="calibration seed")
    b.add_argument("--gen-prompts", type=int, default=0, help="long-form generation check prompts per cell (default 0 = off)")
    b.add_argument("--gen-tokens", type=int, default=None)
    b.add_argument("--cell-lock", default=None, metavar="FILE", help="hold this lock file (flock) while each cell runs, e.g. a shared heavy-job lock")
    b.add_argument("--nproc", type=int, default=1, help="run every cell on N processes (torchrun --standalone; see README, several processes)")
    b.add_argument("--report-only", action="store_true", help="only rewrite report.md and the plots from the finished cells")
    b.add_argument("--peers", default=None, metavar="JSON", help="peer rows (from benchmarks/peers/) to compare against in the report")
    b.add_argument("compress_args", nargs="*", help="after --: extra arguments for every `capllm compress`")


def _floats(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise CapllmError(f"--ratios {s!r} is not a comma-separated list of numbers") from None


def run(a) -> int:
    import json
    from pathlib import Path

    from capllm.grid.report import write_report
    from capllm.grid.run import BenchConfig, plan, run_grid

    args: list[str] = []
    for flag, val in (("--tasks", a.tasks), ("--limit", a.limit), ("--data-dir", a.data_dir), ("--dataset", a.dataset), ("--eval-seqlen", a.eval_seqlen),
                      ("--max-windows", a.max_windows), ("--calib", a.calib), ("--nsamples", a.nsamples), ("--seqlen", a.seqlen), ("--seed", a.seed),
                      ("--gen-tokens", a.gen_tokens)):
        if val is not None:
            args += [flag, str(val)]
    if a.gen_prompts:
        args += ["--gen-prompts", str(a.gen_prompts)]
    if a.tasks:
        from capllm.eval.zeroshot import parse_tasks

        parse_tasks(a.tasks)
    cfg = BenchConfig(
        models=tuple(m.strip() for m in a.models.split(",") if m.strip()),
        methods=tuple(m.strip() for m in a.methods.split(",") if m.strip()),
        ratios=_floats(a.ratios), out=a.out, compress_args=tuple(args + list(a.compress_args)), cell_lock=a.cell_lock,
        nproc=a.nproc,
    )
    if a.nproc < 1:
        raise CapllmError(f"--nproc {a.nproc}: must be ≥ 1")
    peers = json.loads(Path(a.peers).read_text()) if a.peers else None
    if a.report_only:
        print(write_report(a.out, [c.name for c in plan(cfg)], peers))
        return 0
    status = run_grid(cfg, log=lambda s: print(s, file=sys.stderr, flush=True), peers=peers)
    report = Path(a.out) / "report.md"
    print(f"cells: {len(status['done'])} run, {len(status['skipped'])} already finished, {len(status['failed'])} failed; report {report}")
    if status["failed"]:
        print(f"capllm: error: failed cells: {', '.join(status['failed'])} (logs under {a.out}/logs/); rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0

