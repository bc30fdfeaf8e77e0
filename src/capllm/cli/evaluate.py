"""``capllm eval``: perplexity and/or zero-shot accuracy of a model (dense or compressed).

Perplexity is the default. ``--tasks`` adds zero-shot accuracy through lm-eval and, on its own,
skips perplexity unless ``--dataset`` is also given.
"""

from __future__ import annotations

import os

from capllm.cli.common import add_eval_args, add_zeroshot_args, zeroshot_config
from capllm.errors import CapllmError

HELP = "perplexity and/or zero-shot accuracy of a model (dense or compressed)"


def add_parser(sub) -> None:
    from capllm.models.loader import DEFAULT_MODEL

    e = sub.add_parser("eval", help=HELP)
    e.add_argument("--model", default=DEFAULT_MODEL)
    add_eval_args(e, "--seqlen")
    e.set_defaults(dataset=None)  # None: perplexity on `auto` unless --tasks alone was asked for
    e.add_argument("--max-windows", type=int, default=None, help="score only the first K windows (recorded)")
    add_zeroshot_args(e, "--seed")
    e.add_argument("--device", default="auto")
    e.add_argument("--out", default=None, help="directory for result.json (must not exist)")
    e.add_argument("--quiet", action="store_true")


def run(a) -> int:
    from capllm.eval.perplexity import PerplexityConfig, evaluate_perplexity
    from capllm.models.layers import count_params
    from capllm.models.loader import load_model
    from capllm.results import capllm_version, environment
    from capllm.utils import StageTimer, atomic_dir, peak_rss_mb, resolve_device, write_json_atomic

    if a.out and os.path.exists(a.out):
        raise CapllmError(f"output directory {a.out} already exists: choose another --out or remove it")
    zs = zeroshot_config(a)
    do_ppl = zs is None or a.dataset is not None
    if zs is not None:
        from capllm.eval.zeroshot import check_zeroshot

        check_zeroshot(zs)
    device = resolve_device(a.device)
    timer = StageTimer()
    with timer.stage("load_model"):
        model, tok = load_model(a.model)
    ppl = zres = None
    if do_ppl:
        with timer.stage("eval"):
            ppl = evaluate_perplexity(model, tok, PerplexityConfig(a.dataset or "auto", a.split, a.eval_seqlen, a.max_windows, a.batch_size, a.data_dir), device=device, progress=not a.quiet)
        print(f"perplexity {ppl['value']:.4f}  [{ppl['dataset']}:{ppl['split']} ({ppl['origin']}), {ppl['windows']}/{ppl['windows_available']} windows × {ppl['seqlen']}, {ppl['tokens']:,} predicted tokens, BOS: {ppl['bos']}]")
    if zs is not None:
        from capllm.eval.zeroshot import evaluate_zeroshot, zeroshot_table

        with timer.stage("zeroshot"):
            zres = evaluate_zeroshot(model, tok, zs.tasks, zs.limit, zs.seed, zs.batch_size, device, zs.source, zs.include_path, progress=not a.quiet)
        print(zeroshot_table(zres))
    n = count_params(model)
    result = {
        "capllm_version": capllm_version(), "method": "eval", "ratio": None, "structure": None,
        "model": model._capllm_source,
        "params": {"dense_linear": None, "kept_linear": None, "whole_model_dense": n, "whole_model_kept": n},
        "calibration": None, "perplexity": ppl, "time_s": timer.as_dict(), "peak_rss_mb": round(peak_rss_mb(), 1),
        "device": str(device), "layers": [], "environment": environment(),
        **({"zeroshot": zres} if zres is not None else {}),
    }
    if a.out:
        with atomic_dir(a.out) as tmp:
            write_json_atomic(tmp / "result.json", result)
        print(f"written to {a.out}/result.json")
    return 0
