"""``capllm decompose``: CAP Stage 1 — robust PCA of every decoder linear into a resumable cache."""

from __future__ import annotations

import sys
import time

HELP = "robust PCA W = L + S of every decoder linear (CAP Stage 1), cached and resumable"


def add_parser(sub) -> None:
    from capllm.decompose.rpca import SVD_MODES, RPCAConfig
    from capllm.models.loader import DEFAULT_MODEL

    d = RPCAConfig()
    p = sub.add_parser("decompose", help=HELP)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"built-in alias, local directory, .gguf file or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--out", required=True, help="cache directory (created; re-running with the same options resumes)")
    p.add_argument("--lam-scale", type=float, default=d.lam_scale, help=f"λ = lam_scale / sqrt(max(m, n)) (default {d.lam_scale})")
    p.add_argument("--max-iter", type=int, default=d.max_iter, help=f"iteration cap (default {d.max_iter})")
    p.add_argument("--tol", type=float, default=d.tol, help=f"stop at ‖W − L − S‖_F/‖W‖_F < tol (default {d.tol:g})")
    p.add_argument("--rho", type=float, default=d.rho, help=f"μ growth per iteration (default {d.rho})")
    p.add_argument("--svd", default=d.svd, choices=SVD_MODES, help=f"SVT kernel (default {d.svd})")
    p.add_argument("--batch", type=int, default=None, help="same-shape matrices decomposed together (default 8 on a GPU, 1 on a CPU)")
    p.add_argument("--workers", type=int, default=None, help="matrices decomposed at once in threads (default: CPU threads on a CPU, 1 on a GPU)")
    p.add_argument("--act-aware", action="store_true", help="decompose W·diag(sqrt(E[x²])) from a dense calibration pass, then un-scale")
    p.add_argument("--calib", default="auto", help="calibration text for --act-aware: enwiki, c4, wikitext2, a path, or auto")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows for --act-aware (default 32)")
    p.add_argument("--seqlen", type=int, default=512, help="calibration window length for --act-aware (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="local dataset directory (default $CAPLLM_DATA_DIR)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(a) -> int:
    from capllm.decompose.cache import decompose_model
    from capllm.decompose.rpca import RPCAConfig
    from capllm.errors import CapllmError
    from capllm.models.loader import load_model
    from capllm.utils import resolve_device

    if a.batch is not None and a.batch < 1:
        raise CapllmError(f"--batch must be ≥ 1 (got {a.batch})")
    cfg = RPCAConfig(lam_scale=a.lam_scale, max_iter=a.max_iter, tol=a.tol, rho=a.rho, svd=a.svd)
    device = resolve_device(a.device)
    t0 = time.perf_counter()
    model, tok = load_model(a.model)
    stats = scale_info = None
    if a.act_aware:
        from capllm.data.calibration import CalibrationConfig, load_calibration
        from capllm.engine.collect import collect_input_stats

        calib = load_calibration(tok, CalibrationConfig(a.calib, a.nsamples, a.seqlen, a.seed, a.data_dir))
        stats = collect_input_stats(model, calib.windows, device, progress=not a.quiet)
        scale_info = {"statistic": "sqrt(E[x^2])", "calibration": calib.describe()}
    man = decompose_model(model, cfg, a.out, stats=stats, progress=not a.quiet, device=device, batch=a.batch, workers=a.workers, scale_info=scale_info)
    mats = man["matrices"].values()
    n = len(mats)
    conv = sum(1 for m in mats if m["converged"])
    its = [m["iterations"] for m in mats]
    rf = [m["rank_fraction"] for m in mats]
    nf = [m["nnz_fraction"] for m in mats]
    print(f"decomposed {n} matrices into {a.out} in {time.perf_counter() - t0:.1f} s: {conv}/{n} converged (tol {cfg.tol:g}), "
          f"iterations {min(its)}–{max(its)}, rank(L) {min(rf):.0%}–{max(rf):.0%} of full, nnz(S) {min(nf):.0%}–{max(nf):.0%}", file=sys.stderr if a.quiet else sys.stdout)
    return 0
