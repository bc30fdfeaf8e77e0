"""``capllm compress``: compress a model, evaluate before and after, write result.json."""

from __future__ import annotations

import sys

from capllm.cli.common import add_eval_args, add_generation_args, add_zeroshot_args, generation_config, parse_options, zeroshot_config

HELP = "compress a model and report what it achieved"


def add_parser(sub) -> None:
    from capllm.models.loader import DEFAULT_MODEL
    from capllm.pipeline import DEFAULT_METHOD

    c = sub.add_parser("compress", help=HELP)
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
    c.add_argument("--out", default=None, help="output directory (must not exist; default runs/<time>-<model>-<method>-<ratio>): result.json and the saved model; "
                   "an interrupted run with the same --out resumes from OUT.work/")
    c.add_argument("--resume", default=None, metavar="DIR", help="resume the interrupted run whose --out was DIR (the same as repeating its command)")
    c.add_argument("--dtype", default="auto", help="compute dtype of each block: auto (float32 on a CPU, bfloat16 on a GPU), float32, bfloat16, float16")
    c.add_argument("--save", choices=["compressed", "dense", "none"], default="compressed", help="what to write next to result.json: the compressed model (default; load it with capllm or transformers trust_remote_code), a plain dense HF checkpoint, or nothing")
    c.add_argument("--eval", dest="evaluate", action="store_true", default=True, help="evaluate perplexity before and after (default)")
    c.add_argument("--no-eval", dest="evaluate", action="store_false", help="skip evaluation")
    c.add_argument("--max-windows", type=int, default=16, help="evaluation windows to score (default 16; 0 = all)")
    c.add_argument("--plot", action="store_true", help="write allocation.png: rank and sparsity kept per layer and module (cap methods)")
    c.add_argument("--no-dense-cache", action="store_true", help="re-evaluate the dense model even if a cached figure exists")
    add_eval_args(c, "--eval-seqlen")
    add_zeroshot_args(c, "--zs-seed")
    add_generation_args(c)
    c.add_argument("--quiet", action="store_true", help="no progress bars")


def run(a) -> int:
    from capllm.data.calibration import CalibrationConfig
    from capllm.eval.perplexity import PerplexityConfig
    from capllm.pipeline import CompressConfig, JobConfig, run_compress_job
    from capllm.results import summary_table

    if a.resume:
        from pathlib import Path

        from capllm.errors import CapllmError
        from capllm.workdir import work_dir_for

        if a.out and Path(a.out) != Path(a.resume):
            raise CapllmError(f"--resume {a.resume} and --out {a.out} differ: give one of them")
        job_file = work_dir_for(a.resume) / "job.json"
        if not job_file.is_file():
            raise CapllmError(f"--resume {a.resume}: no interrupted run there ({job_file} does not exist)")
        import json

        try:
            saved = json.loads(job_file.read_text()).get("arguments") or {}
        except (OSError, json.JSONDecodeError) as exc:
            raise CapllmError(f"--resume {a.resume}: {job_file} is unreadable ({exc}); run the original command again instead") from exc
        for k, v in saved.items():  # the interrupted run's own arguments (progress bars as asked now)
            if k not in ("quiet", "resume", "out", "func", "cmd"):
                setattr(a, k, v)
        a.out = a.resume
    job = JobConfig(
        model=a.model,
        compress=CompressConfig(
            method=a.method, ratio=a.ratio, structure=a.structure,
            calibration=CalibrationConfig(a.calib, a.nsamples, a.seqlen, a.seed, a.data_dir),
            device=a.device, options=parse_options(a.option), progress=not a.quiet, dtype=a.dtype,
        ),
        evaluate=a.evaluate,
        eval=PerplexityConfig(a.dataset, a.split, a.eval_seqlen, a.max_windows or None, a.batch_size, a.data_dir),
        out=a.out,
        dense_cache=not a.no_dense_cache,
        save=a.save,
        zeroshot=zeroshot_config(a),
        generation=generation_config(a),
        plot=a.plot,
        arguments={k: v for k, v in vars(a).items() if isinstance(v, (str, int, float, bool, list, type(None)))},
    )
    from capllm.engine.distributed import from_env
    from capllm.utils import resolve_device

    dist = from_env(resolve_device(a.device).type)  # torchrun: join its process group (else one process)
    try:
        result = run_compress_job(job, log=lambda s: print(s, file=sys.stderr), dist=dist)
    finally:
        if dist.enabled and torch_distributed_initialized():
            import torch.distributed

            torch.distributed.destroy_process_group()
    if not dist.is_main:
        return 0
    print(summary_table(result))
    st = result.get("storage")
    if st:
        frac = f", decoder linears {st['decoder_bytes'] / st['decoder_dense_bytes']:.1%} of dense incl. {st['index_overhead_bytes'] / 2**20:.1f} MiB index" if st.get("decoder_dense_bytes") else ""
        print(f"saved {st['format']} model: {st['total_bytes'] / 2**20:.1f} MiB on disk{frac} → {result['out_dir']}")
    return 0


def torch_distributed_initialized() -> bool:
    import torch.distributed

    return torch.distributed.is_available() and torch.distributed.is_initialized()
