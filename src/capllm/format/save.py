"""Write a compressed model to a directory: ``config.json`` + safetensors shards + tokenizer.

``save_compressed(model, dir, tokenizer=None, result=None)`` writes atomically (a temporary
directory renamed into place). The directory holds

* ``config.json``: the model's config plus ``auto_map`` (for ``trust_remote_code`` loading) and a
  ``capllm`` section: ``format_version``, ``dtype``, ``modules`` (one entry per compressed
  linear: ``name``, ``kind`` (the architecture's own module: ``linear`` or ``conv1d``),
  ``shape [out, in]``, ``rank``, ``nnz``, ``bias``, ``sparse_layout`` (``bitmask``, ``dense`` or
  null), ``dtype``), ``files`` (bytes and SHA-256 of every other file) and ``storage`` (bytes);
* ``model.safetensors`` or ``model-0000i-of-0000k.safetensors`` + ``model.safetensors.index.json``
  (no pickles): every tensor of the model, with each compressed linear stored as described in
  :mod:`capllm.format.modeling_capllm` (values + packed bitmask for ``S``);
* ``modeling_capllm.py`` (plain-transformers loading), the tokenizer, ``generation_config.json``,
  and ``result.json`` of the run when given.

A decoder linear left as an ordinary ``nn.Linear``/``Conv1D`` (a sparse-only method) is stored
packed when its zeros make packing smaller (:func:`~capllm.format.bitmask.packing_pays`), and as
its ordinary ``weight`` tensor otherwise. Embeddings, norms and the LM head are stored as they
are. ``write_dense`` writes a plain Hugging Face checkpoint instead (low-rank factors merged,
zeros kept), for tools that know nothing of capllm.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from capllm.errors import CapllmError
from capllm.format import modeling_capllm
from capllm.format.bitmask import pack_bitmask, packing_pays
from capllm.format.modules import LowRankSparseLinear
from capllm.models.layers import find_linears, is_linear
from capllm.utils import _umask, atomic_dir, release_host_pages, write_json_atomic

DEFAULT_SHARD_SIZE = "2GB"
MODELING_FILE = "modeling_capllm.py"
RESULT_FILE = "result.json"


def reference_linears(model: nn.Module) -> dict[str, tuple[str, tuple[int, int], bool]]:
    """``{name: (kind, (out, in), has_bias)}`` of the decoder linears of ``model``'s *architecture*.

    Built from the config on the meta device, so it holds even after a method has replaced
    modules by :class:`LowRankSparseLinear` (which the engine's discovery does not see).
    """
    with torch.device("meta"):
        ref = type(model)(copy.deepcopy(model.config))
    return {h.name: ("conv1d" if h.conv1d else "linear", h.shape, h.bias is not None) for h in find_linears(ref)}


def _dense_weight(mod: nn.Module, kind: str) -> torch.Tensor:
    """``(out, in)`` weight of a plain linear or Conv1D."""
    w = mod.weight.detach()
    return w.t() if kind == "conv1d" else w


def _module_tensors(name: str, mod: nn.Module, kind: str, shape, compressed: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Tensors to store for one decoder linear and its ``capllm.modules`` entry (None: stored plain)."""
    m, n = shape
    bias = getattr(mod, "bias", None)
    if isinstance(mod, LowRankSparseLinear):
        U, V, S, rank = mod.U, mod.V, mod.sparse_dense(), mod.rank
    elif is_linear(mod):
        U = V = None
        S, rank = _dense_weight(mod, kind), 0
    else:
        raise CapllmError(f"cannot save {name}: a {type(mod).__name__} where the architecture has a linear layer")
    if not compressed:  # a plain checkpoint: merge and store in the architecture's layout
        W = S if U is None else (U @ V.t() if S is None else U @ V.t() + S)
        out = {f"{name}.weight": (W.t() if kind == "conv1d" else W).detach()}
        if bias is not None:
            out[f"{name}.bias"] = bias.detach()
        return out, None
    itemsize = (U if U is not None else S).element_size()
    nnz = 0 if S is None else int((S != 0).sum())
    layout = None if S is None else ("bitmask" if packing_pays(m, n, nnz, itemsize) else "dense")
    if rank == 0 and layout == "dense":  # nothing gained: keep the ordinary tensor
        out = {f"{name}.weight": mod.weight.detach()} if is_linear(mod) else {f"{name}.weight": (S.t() if kind == "conv1d" else S).detach()}
        if bias is not None:
            out[f"{name}.bias"] = bias.detach()
        return out, None
    out = {}
    if U is not None:
        out[f"{name}.U"], out[f"{name}.V"] = U.detach(), V.detach()
    if layout == "bitmask":
        out[f"{name}.S_values"], out[f"{name}.S_bitmask"] = pack_bitmask(S.detach())
    elif layout == "dense":
        out[f"{name}.S"] = S.detach()
    if bias is not None:
        out[f"{name}.bias"] = bias.detach()
    dtype = str((U if U is not None else S).dtype).replace("torch.", "")
    spec = {"name": name, "kind": kind, "shape": [m, n], "rank": rank, "nnz": nnz, "bias": bias is not None, "sparse_layout": layout, "dtype": dtype}
    return out, spec


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def plan_state(model: nn.Module, compressed: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Callable[[], dict[str, torch.Tensor]]], list[dict], dict[str, Any]]:
    """What the checkpoint of ``model`` will hold, without holding it.

    Returns ``(layout, sources, specs, storage)``: ``layout`` maps every tensor name to a meta
    tensor of its shape and dtype (what the shard split needs); ``sources[name]()`` makes that
    tensor — with the other tensors of its module — when its shard is written; ``specs`` are the
    ``capllm.modules`` entries and ``storage`` the byte accounting. Each module is visited once
    here (one module's packed tensors alive at a time), so saving needs one shard in memory,
    never the whole compressed model.
    """
    ref = reference_linears(model)
    names = list(ref)
    names += [n for n, mod in model.named_modules() if isinstance(mod, LowRankSparseLinear) and n not in ref]
    full = model.state_dict(keep_vars=False)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    layout: dict[str, torch.Tensor] = {}
    sources: dict[str, Callable[[], dict[str, torch.Tensor]]] = {}
    taken = set()
    for name in names:
        taken.update(k for k in full if k.startswith(name + "."))
    for k, t in full.items():
        if k in taken or (k in tied and tied[k] in full):
            continue
        layout[k] = _meta(t)
        sources[k] = functools.partial(lambda k, t: {k: t.detach()}, k, t)
    del full
    specs, dec_bytes, dec_dense, index_bytes = [], 0, 0, 0
    for name in names:
        mod = model.get_submodule(name)
        kind, shape, _ = ref[name] if name in ref else ("linear", (mod.out_features, mod.in_features), False)
        out, spec = _module_tensors(name, mod, kind, shape, compressed)
        itemsize = next(iter(out.values())).element_size()
        bias_n = out[f"{name}.bias"].numel() if f"{name}.bias" in out else 0
        dec_dense += (shape[0] * shape[1] + bias_n) * itemsize
        dec_bytes += sum(t.numel() * t.element_size() for t in out.values())
        if spec is not None:
            specs.append(spec)
            if spec["sparse_layout"] == "bitmask":
                index_bytes += out[f"{name}.S_bitmask"].numel()
        make = functools.partial(lambda *a: _module_tensors(*a)[0], name, mod, kind, shape, compressed)
        for k, t in out.items():
            layout[k], sources[k] = _meta(t), make
        del out
        release_host_pages([p.data for p in mod.parameters()], clean_only=True)
    tensor_bytes = sum(t.numel() * t.element_size() for t in layout.values())
    storage = {
        "decoder_bytes": dec_bytes,
        "decoder_dense_bytes": dec_dense,
        "decoder_fraction": round(dec_bytes / dec_dense, 6) if dec_dense else None,
        "index_overhead_bytes": index_bytes,
        "tensor_bytes": tensor_bytes,
        "dense_tensor_bytes": tensor_bytes - dec_bytes + dec_dense,
        "counted": "decoder_* = tensors of the decoder-block linear layers (weights, factors, values, bitmasks, biases); index_overhead = the packed bitmasks",
    }
    return layout, sources, specs, storage


def _write_shards(model: nn.Module, layout: dict[str, torch.Tensor], sources: dict[str, Callable], folder: Path, max_shard_size: int | str) -> None:
    """Split ``layout`` into shards (huggingface_hub's rule) and write them one at a time, each
    made from ``sources`` just before it is written and freed after (its mapped pages too)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(layout, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        made: dict[str, torch.Tensor] = {}
        for k in keys:
            if k not in made:
                made.update(sources[k]())
        tensors, seen = {}, set()
        for k in keys:  # safetensors refuses tensors sharing memory: give each its own storage
            t = made[k].contiguous()
            if t.layout != torch.strided:
                raise CapllmError(f"cannot save tensor {k}: layout {t.layout} (convert the model to dense execution first)")
            ptr = (t.untyped_storage().data_ptr(), t.storage_offset())
            tensors[k] = t.clone() if ptr in seen else t
            seen.add(ptr)
        save_file(tensors, str(folder / filename), metadata={"format": "pt"})
        os.chmod(folder / filename, 0o666 & ~_umask())  # safetensors writes owner-only files
        del made, tensors
        modules = {k.rpartition(".")[0] for k in keys}
        release_host_pages([p.data for n in modules if _has_module(model, n) for p in model.get_submodule(n).parameters(recurse=False)], clean_only=True)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in layout.values())}, "weight_map": split.tensor_to_filename}
        write_json_atomic(folder / "model.safetensors.index.json", index)


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _file_records(folder: Path, skip: set[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in skip:
            out[rel] = {"bytes": p.stat().st_size, "sha256": modeling_capllm.sha256_file(str(p))}
    return out


def _total_bytes(folder: Path) -> int:
    """Bytes of every file of the saved model (``result.json`` of the run not counted)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != RESULT_FILE)


def _config_dict(model: nn.Module) -> dict[str, Any]:
    d = model.config.to_dict()
    for k in (modeling_capllm.CONFIG_KEY, "auto_map"):
        d.pop(k, None)
    d["architectures"] = [type(model).__name__]
    d["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    return d


def _save_extras(model: nn.Module, folder: Path, tokenizer) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(folder)
        except (ValueError, OSError):
            pass  # an invalid generation config is not worth failing a save for


def write_compressed(model: nn.Module, folder: str | os.PathLike, tokenizer=None, result: dict | None = None, max_shard_size: int | str = DEFAULT_SHARD_SIZE) -> dict[str, Any]:
    """Write the compressed format into the existing directory ``folder``; return the storage block.

    ``result`` (the run's result dict) only lends its method and ratio to ``config.json``; the
    caller writes ``result.json`` (with the returned storage block in it).
    """
    import transformers

    folder = Path(folder)
    layout, sources, specs, storage = plan_state(model, compressed=True)
    _write_shards(model, layout, sources, folder, max_shard_size)
    del layout, sources
    arch = type(model).__name__
    remote = isinstance(getattr(transformers, arch, None), type)
    if remote:
        shutil.copyfile(modeling_capllm.__file__, folder / MODELING_FILE)
    _save_extras(model, folder, tokenizer)
    files = _file_records(folder, skip={"config.json", RESULT_FILE})
    cfg = _config_dict(model)
    if remote:
        cfg["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{modeling_capllm.CLASS_PREFIX}{arch}"}
    cfg[modeling_capllm.CONFIG_KEY] = {
        "format_version": modeling_capllm.FORMAT_VERSION,
        "dtype": cfg["dtype"],
        "modules": specs,
        "files": files,
        "storage": dict(storage),
        **({"method": result.get("method"), "ratio": result.get("ratio")} if result else {}),
    }
    write_json_atomic(folder / "config.json", cfg)
    storage["total_bytes"] = _total_bytes(folder)
    return storage


def write_dense(model: nn.Module, folder: str | os.PathLike, tokenizer=None, max_shard_size: int | str = DEFAULT_SHARD_SIZE) -> dict[str, Any]:
    """Write a plain Hugging Face checkpoint (low-rank parts merged) into ``folder``."""
    folder = Path(folder)
    layout, sources, _, storage = plan_state(model, compressed=False)
    _write_shards(model, layout, sources, folder, max_shard_size)
    del layout, sources
    _save_extras(model, folder, tokenizer)
    write_json_atomic(folder / "config.json", _config_dict(model))
    storage["total_bytes"] = _total_bytes(folder)
    return storage


def save_compressed(model: nn.Module, path: str | os.PathLike, tokenizer=None, result: dict | None = None, max_shard_size: int | str = DEFAULT_SHARD_SIZE) -> dict[str, Any]:
    """Save ``model`` in capllm's compressed format to the new directory ``path`` (atomically).

    Returns the storage accounting (bytes on disk; also in ``config.json`` and ``result.json``).
    """
    with atomic_dir(path) as tmp:
        storage = write_compressed(model, tmp, tokenizer, result, max_shard_size)
        if result is not None:
            write_json_atomic(tmp / RESULT_FILE, {**result, "storage": {"format": "compressed", **storage}})
    return storage


def save_dense(model: nn.Module, path: str | os.PathLike, tokenizer=None, result: dict | None = None, max_shard_size: int | str = DEFAULT_SHARD_SIZE) -> dict[str, Any]:
    """Save ``model`` as a plain Hugging Face checkpoint to the new directory ``path`` (atomically)."""
    with atomic_dir(path) as tmp:
        storage = write_dense(model, tmp, tokenizer, max_shard_size)
        if result is not None:
            write_json_atomic(tmp / RESULT_FILE, {**result, "storage": {"format": "dense", **storage}})
    return storage
