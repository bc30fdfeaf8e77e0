"""Stage 1 over a whole model, with a resumable per-matrix cache on disk.

Layout of ``DIR``::

    DIR/manifest.json                     format, model source, RPCA config (+ activation scaling),
                                          per matrix: shape, iterations, residual, converged, rank,
                                          nnz (and their fractions), S_energy = ‖S‖_F/‖W‖_F,
                                          seconds, file
    DIR/<linear name>.safetensors         U (m, r), sigma (r,), V (n, r), S (m, n) — fp32;
                                          metadata: iterations, residual, converged, lam, history

Every file is written to a temporary name and renamed, the matrix's file before its manifest
entry, so a killed run leaves only complete entries; re-running with the same configuration
skips them. A different configuration (or model) in the same ``DIR`` is an error.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from capllm.decompose.rpca import RPCAConfig, RPCAResult, map_in_threads, rpca_batched
from capllm.errors import CapllmError
from capllm.models.layers import LinearHandle, find_linears
from capllm.utils import write_json_atomic

FORMAT = "capllm-rpca-v1"
MANIFEST = "manifest.json"


def _file_name(name: str) -> str:
    return f"{name}.safetensors"


def save_decomposition(path: str | os.PathLike, name: str, res: RPCAResult) -> None:
    """Write one result atomically (temp file + rename)."""
    path = Path(path)
    tensors = {k: t.detach().to("cpu", torch.float32).contiguous() for k, t in (("U", res.U), ("sigma", res.sigma), ("V", res.V), ("S", res.S))}
    meta = {"format": FORMAT, "name": name, "iterations": str(res.iterations), "residual": repr(res.residual), "converged": str(bool(res.converged)),
            "lam": repr(res.lam), "seconds": repr(res.seconds), "history": json.dumps(res.history)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_manifest(out_dir: Path) -> dict | None:
    p = out_dir / MANIFEST
    if not p.exists():
        return None
    try:
        man = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CapllmError(f"{p} is not a readable capllm decomposition manifest ({exc}): remove it or choose another --out") from exc
    if man.get("format") != FORMAT:
        raise CapllmError(f"{p} is not a {FORMAT} manifest (format {man.get('format')!r}): choose another --out")
    return man


def load_decomposition(out_dir: str | os.PathLike, name: str, device: torch.device | str = "cpu") -> RPCAResult:
    """The cached :class:`RPCAResult` of linear ``name`` in ``out_dir``."""
    out_dir = Path(out_dir)
    man = _read_manifest(out_dir)
    if man is None:
        raise CapllmError(f"{out_dir} has no {MANIFEST}: run `capllm decompose --out {out_dir}` first")
    entry = man["matrices"].get(name)
    if entry is None:
        raise CapllmError(f"{out_dir} has no decomposition of {name!r} ({len(man['matrices'])} matrices done): finish the run with `capllm decompose`")
    f = out_dir / entry["file"]
    with safe_open(str(f), framework="pt", device=str(device)) as sf:
        meta = sf.metadata()
        t = {k: sf.get_tensor(k) for k in ("U", "sigma", "V", "S")}
    return RPCAResult(t["U"], t["sigma"], t["V"], t["S"], int(meta["iterations"]), float(meta["residual"]), meta["converged"] == "True",
                      float(meta["lam"]), json.loads(meta["history"]), float(meta["seconds"]))


def iter_decompositions(out_dir: str | os.PathLike, device: torch.device | str = "cpu") -> Iterator[tuple[str, RPCAResult]]:
    """``(name, RPCAResult)`` for every finished matrix, in model order."""
    man = _read_manifest(Path(out_dir))
    if man is None:
        raise CapllmError(f"{out_dir} has no {MANIFEST}: run `capllm decompose --out {out_dir}` first")
    for name in man["matrices"]:
        yield name, load_decomposition(out_dir, name, device)


def _groups(handles: list[LinearHandle], batch: int) -> list[list[LinearHandle]]:
    """Same-shape, same-role matrices in batches of ``batch``, in model order of first appearance."""
    by_key: dict[tuple, list[LinearHandle]] = {}
    for h in handles:
        by_key.setdefault((h.local_name, h.shape), []).append(h)
    out = []
    for hs in by_key.values():
        out.extend(hs[i : i + batch] for i in range(0, len(hs), batch))
    return out


def _on_cpu(device) -> bool:
    return device is None or torch.device(device).type == "cpu"


def _default_workers(device) -> int:
    return torch.get_num_threads() if _on_cpu(device) else 1


def _default_batch(device) -> int:
    return 1 if _on_cpu(device) else 8


def _run(handles, cfg, scales, device, batch, workers, progress, on_result) -> None:
    """Decompose ``handles`` in same-shape units of ``batch``, ``workers`` units at a time;
    ``on_result(handle, result)`` runs in the calling thread as each unit finishes."""
    for h in handles:  # fail before any work, naming the layer (rpca's own check cannot name it)
        W = h.weight()
        if W.is_floating_point() and not bool(torch.isfinite(W).all()):
            raise CapllmError(f"{h.name} has {int((~torch.isfinite(W)).sum())} NaN/Inf weights: fix or re-load the model before decomposing")
    units = _groups(handles, _default_batch(device) if batch is None else batch)
    workers = _default_workers(device) if workers is None else max(1, workers)

    def work(group):
        Ws = torch.stack([h.weight_copy() for h in group])
        cs = None if scales is None else torch.stack([scales[h.name] for h in group])
        return rpca_batched(Ws, col_scale=cs, device=device, config=cfg)

    bar = tqdm(total=len(handles), desc="robust PCA", unit="matrix", disable=not progress)
    for i, results in map_in_threads(work, units, workers):
        for h, r in zip(units[i], results):
            on_result(h, r)
            bar.update(1)
            bar.set_postfix_str(f"{h.local_name} it={r.iterations} r={r.rank}")
    bar.close()


def column_scales(handles: list[LinearHandle], stats: dict | None = None, col_scales: dict | None = None) -> dict[str, torch.Tensor] | None:
    """``{name: d (n,)}`` fp32 on CPU from ``stats`` (``d = sqrt(E x²)``) or given ``col_scales``."""
    if stats is not None and col_scales is not None:
        raise CapllmError("pass either stats or col_scales, not both")
    if stats is None and col_scales is None:
        return None
    out = {}
    for h in handles:
        if stats is not None:
            st = stats.get(h.name)
            if st is None or st.sq is None:
                raise CapllmError(f"no activation statistics for {h.name}: collect E[x²] for every decoder linear (capllm.engine.collect.collect_input_stats)")
            d = st.sq.clamp_min(0).sqrt()
        else:
            d = col_scales.get(h.name)
            if d is None:
                raise CapllmError(f"no column scales for {h.name}: give one per decoder linear")
        d = d.detach().to("cpu", torch.float32).reshape(-1)
        if d.numel() != h.shape[1]:
            raise CapllmError(f"column scales for {h.name} have {d.numel()} entries, the layer has {h.shape[1]} inputs")
        out[h.name] = d
    return out


def decompose_in_memory(model, cfg: RPCAConfig = RPCAConfig(), stats: dict | None = None, device: torch.device | str | None = None, batch: int = 1,
                        workers: int | None = None, progress: bool = False, col_scales: dict | None = None) -> dict[str, RPCAResult]:
    """Stage 1 of every decoder linear, results kept in memory (small models); arguments as :func:`decompose_model`."""
    handles = find_linears(model)
    out: dict[str, RPCAResult] = {}
    _run(handles, cfg, column_scales(handles, stats, col_scales), device, batch, workers, progress, lambda h, r: out.__setitem__(h.name, r))
    return {h.name: out[h.name] for h in handles}


def decompose_model(model, cfg: RPCAConfig, out_dir: str | os.PathLike, stats: dict | None = None, progress: bool = True, device: torch.device | str | None = None,
                    batch: int | None = None, workers: int | None = None, scale_info: dict | None = None, names: list[str] | None = None,
                    col_scales: dict | None = None, dist=None) -> dict:
    """Stage 1 of every decoder linear into the resumable cache ``out_dir``; returns the manifest.

    ``dist`` (:class:`capllm.engine.distributed.Dist`, every rank calling with the same
    arguments): the pending matrices are divided among the ranks by cost (:meth:`~capllm.engine.distributed.Dist.owners`), each writes its
    own matrices' files, and rank 0 alone writes the manifest (its entries gathered from all).

    ``stats``: ``{name: InputStats}`` → activation-aware RPCA of ``W·diag(sqrt(E x²))``; or
    ``col_scales``: ``{name: d (n,)}`` given directly. ``scale_info`` describes where the scales
    came from (recorded). A resumed run must match the configuration, including the scales
    (their per-matrix norms, to 1e-4 relative, so bit-level noise in recomputed statistics does
    not block a resume). ``names`` restricts the run to some linears.
    ``batch`` same-shape matrices run as one batched IALM (default: 8 on a GPU, where it pays, 1 on
    a CPU); ``workers`` such units run at once in threads (default: one per CPU thread on a CPU, 1 on
    a GPU).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CapllmError(f"--out {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    source = getattr(model, "_capllm_source", {"name": type(model).__name__, "revision_or_path": None})
    all_handles = find_linears(model)
    handles = all_handles
    if names is not None:
        unknown = sorted(set(names) - {h.name for h in handles})
        if unknown:
            raise CapllmError(f"unknown linear layer {unknown[0]!r}")
        handles = [h for h in handles if h.name in set(names)]
    scales = column_scales(handles, stats, col_scales)
    aa = None
    if scales is not None:
        aa = dict(scale_info or {"statistic": "sqrt(E[x^2])" if stats is not None else "caller-provided column scales"})
        aa["scale_norms"] = {name: float(d.norm()) for name, d in scales.items()}
    config = {"rpca": cfg.to_dict(), "activation_aware": aa}
    from capllm.engine.distributed import SINGLE

    dist = dist or SINGLE
    if not dist.is_main:  # rank 0 checks and writes the manifest first
        dist.barrier()
        return _decompose_share(_read_manifest(out_dir), handles, all_handles, cfg, scales, device, batch, workers, out_dir, dist)
    man = _read_manifest(out_dir)
    if man is None:
        man = {"format": FORMAT, "model": source, "config": config, "matrices": {}}
    else:
        if not _same_config(man["config"], config):
            raise CapllmError(f"{out_dir} holds a decomposition with a different configuration ({_diff(man['config'], config)}): use another --out, or the same options to resume")
        if man.get("model") != source:
            raise CapllmError(f"{out_dir} holds a decomposition of another model ({man.get('model')}): use another --out")
        if aa is not None:  # a block-by-block run adds its matrices' scales as it goes
            old_aa = man["config"].get("activation_aware") or {}
            man["config"]["activation_aware"] = {**old_aa, "scale_norms": {**old_aa.get("scale_norms", {}), **aa["scale_norms"]}}
    pending = _pending(man, handles, out_dir)
    if progress and len(pending) < len(handles):
        print(f"capllm: resuming: {len(handles) - len(pending)} of {len(handles)} matrices already in {out_dir}")
    write_json_atomic(out_dir / MANIFEST, man)
    if dist.enabled:
        dist.barrier()
        return _decompose_share(man, handles, all_handles, cfg, scales, device, batch, workers, out_dir, dist, progress)

    def on_result(h: LinearHandle, r: RPCAResult) -> None:
        save_decomposition(out_dir / _file_name(h.name), h.name, r)
        man["matrices"][h.name] = _entry(h, r)
        _sort(man, all_handles)
        write_json_atomic(out_dir / MANIFEST, man)

    _run(pending, cfg, scales, device, batch, workers, progress, on_result)
    return man


def _pending(man: dict, handles: list[LinearHandle], out_dir: Path) -> list[LinearHandle]:
    return [h for h in handles if not (h.name in man["matrices"] and (out_dir / man["matrices"][h.name]["file"]).exists())]


def _entry(h: LinearHandle, r: RPCAResult) -> dict:
    m, n = h.shape
    return {"shape": [m, n], "iterations": r.iterations, "residual": r.residual, "converged": r.converged,
            "rank": r.rank, "nnz": r.nnz, "rank_fraction": round(r.rank / min(m, n), 4), "nnz_fraction": round(r.nnz / (m * n), 4),
            "S_energy": round(float(r.S.norm() / h.weight_copy().norm().clamp_min(1e-30)), 4),
            "seconds": round(r.seconds, 3), "file": _file_name(h.name)}


def _sort(man: dict, all_handles: list[LinearHandle]) -> None:
    order = {x.name: i for i, x in enumerate(all_handles)}
    man["matrices"] = dict(sorted(man["matrices"].items(), key=lambda kv: order.get(kv[0], 1 << 30)))


def _decompose_share(man, handles, all_handles, cfg, scales, device, batch, workers, out_dir: Path, dist, progress: bool = False) -> dict:
    """Several processes: this rank's share of the pending matrices, balanced by the cost of an
    SVD (``m n min(m, n)``, :meth:`Dist.owners`); the manifest entries of all ranks are gathered
    and written by rank 0 (a killed run recomputes what no manifest entry records)."""
    from capllm.engine.distributed import svd_cost

    pending = _pending(man, handles, out_dir)
    owners = dist.owners([svd_cost(h.shape) for h in pending])
    mine = [h for j, h in enumerate(pending) if owners[j] == dist.rank]
    entries: dict[str, dict] = {}

    def on_result(h: LinearHandle, r: RPCAResult) -> None:
        save_decomposition(out_dir / _file_name(h.name), h.name, r)
        entries[h.name] = _entry(h, r)

    _run(mine, cfg, scales, device, batch, workers, progress and dist.is_main, on_result)
    for part in dist.all_gather_object(entries):
        man["matrices"].update(part)
    _sort(man, all_handles)
    if dist.is_main:
        write_json_atomic(out_dir / MANIFEST, man)
    dist.barrier()
    return man


def _same_config(old: dict, new: dict) -> bool:
    """Equal configurations; per-matrix scale norms are compared where both have the matrix
    (a run that decomposes some matrices at a time records each matrix's scales when it does)."""
    a, b = _flatten(old), _flatten(new)
    a = {k: v for k, v in a.items() if ".scale_norms." not in k or k in b}
    b = {k: v for k, v in b.items() if ".scale_norms." not in k or k in a}
    if a.keys() != b.keys():
        return False
    for k in a:
        if ".scale_norms." in k and isinstance(a[k], float) and isinstance(b[k], float):
            if abs(a[k] - b[k]) > 1e-4 * max(abs(a[k]), abs(b[k]), 1e-30):
                return False
        elif a[k] != b[k]:
            return False
    return True


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _diff(old: dict, new: dict) -> str:
    a, b = _flatten(old), _flatten(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    keys = [k for k in keys if ".scale_norms." not in k] + [k for k in keys if ".scale_norms." in k]
    return ", ".join(f"{k}: {a.get(k)!r} there vs {b.get(k)!r} now" for k in keys[:3]) or "unknown difference"
