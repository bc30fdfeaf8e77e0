"""Load a directory written by :func:`capllm.save_compressed` back into a runnable model.

Steps: read ``config.json`` and its ``capllm`` section; check every recorded file's size and
SHA-256 (a truncated or altered file is a :class:`CapllmError`, never a silently wrong model);
build the architecture from the config with the compressed modules swapped in and let
transformers' loader fill it (meta-device init, then materialised from the safetensors shards;
the same class that ``trust_remote_code`` loading uses, taken from capllm's own copy of
``modeling_capllm.py`` — no code from the directory runs); refuse missing, unexpected or
mis-shaped tensors; then turn each packed module into its fastest runnable form on ``device``
(:mod:`capllm.format.execution`): a :class:`LowRankSparseLinear` holding ``S`` packed (the
bitmask kernel; only the packed bytes stay in memory), dense or CSR, or, for a sparse-only layer
on the dense path, the architecture's own ``nn.Linear``/``Conv1D`` with the unpacked weight
(bit-for-bit the in-memory compressed layer). Layers are converted one at a time, so at most
one layer's dense ``S`` exists beside the packed model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from capllm.errors import CapllmError
from capllm.format import modeling_capllm
from capllm.format.bitmask import csr_from_bitmask, unpack_bitmask
from capllm.format.execution import check_policy, choose_layout, forced_layout
from capllm.format.modules import LowRankSparseLinear
from capllm.kernels import VALUE_DTYPES, BitmaskMatrix
from capllm.utils import release_host_pages, trim_heap


def read_section(path: Path) -> dict:
    """The ``capllm`` section of ``path/config.json`` (CapllmError when absent or unreadable)."""
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CapllmError(f"{path} has no config.json: not a model directory")
    try:
        raw = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CapllmError(f"{cfg} is not valid JSON ({exc.__class__.__name__}): the directory is corrupt") from None
    section = raw.get(modeling_capllm.CONFIG_KEY)
    if not isinstance(section, dict):
        raise CapllmError(f"{cfg} has no 'capllm' section: not a capllm compressed model (load it with capllm.load_model)")
    version = section.get("format_version")
    if not isinstance(version, int) or version > modeling_capllm.FORMAT_VERSION:
        raise CapllmError(f"{path}: compressed format version {version!r} is not readable by this capllm (reads ≤ {modeling_capllm.FORMAT_VERSION}): upgrade capllm")
    return section


def verify(path: Path, section: dict) -> None:
    try:
        modeling_capllm.verify_files(str(path), section.get("files") or {})
    except ValueError as exc:
        raise CapllmError(str(exc).removeprefix("capllm: ")) from None


def _plain_module(kind: str, W: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """The architecture's own module (``nn.Linear`` or GPT-2 ``Conv1D``) holding ``W (out, in)``."""
    out_f, in_f = W.shape
    if kind == "conv1d":
        from transformers.pytorch_utils import Conv1D

        with torch.device("meta"):
            mod = Conv1D(out_f, in_f)
        mod.weight = nn.Parameter(W.t().contiguous(), requires_grad=False)
        mod.bias = nn.Parameter(bias if bias is not None else torch.zeros(out_f, dtype=W.dtype, device=W.device), requires_grad=False)
        return mod
    with torch.device("meta"):
        mod = nn.Linear(in_f, out_f, bias=bias is not None)
    mod.weight = nn.Parameter(W, requires_grad=False)
    if bias is not None:
        mod.bias = nn.Parameter(bias, requires_grad=False)
    return mod


def _release_replaced(packed: modeling_capllm.CapllmLinear, S: torch.Tensor | None, bits: BitmaskMatrix | None) -> None:
    """Drop the checkpoint-mapped pages of the packed tensors that the runnable form copied (the
    values, padded for the kernel; the mask too when ``S`` was unpacked or converted), so the
    checkpoint's file pages do not stay resident beside the copies."""
    kept = set()
    for t in ([S] if S is not None and S.layout == torch.strided else []) + (list(bits.tensors().values()) if bits is not None else []):
        kept.add(t.untyped_storage().data_ptr())
    done = [t.data for t in (getattr(packed, "S_values", None), getattr(packed, "S_bitmask", None), getattr(packed, "S", None))
            if t is not None and t.untyped_storage().data_ptr() not in kept]
    release_host_pages(done)


def _runnable(packed: modeling_capllm.CapllmLinear, spec: dict, policy: str, sparse_dtype: torch.dtype | None) -> nn.Module:
    """Replace one packed module by its runnable form (see the module docstring)."""
    shape = tuple(spec["shape"])
    bias = None if packed.bias is None else packed.bias.data
    S = bits = None
    decision = layout = None
    if packed.layout == "bitmask":
        vdt = sparse_dtype or packed.S_values.dtype
        dense_dtype = packed.S_values.dtype
        if policy in ("dense", "csr"):  # nothing to choose: no padded kernel copy of the values
            layout, decision = forced_layout(policy, shape, packed.S_values.numel(), packed.S_values.device)
        elif vdt in VALUE_DTYPES:
            bits = BitmaskMatrix.from_packed(packed.S_values.data, packed.S_bitmask, shape, vdt)
            layout, decision = choose_layout(bits, policy, dense_dtype=dense_dtype)
        else:
            S = unpack_bitmask(packed.S_values.data, packed.S_bitmask, shape)
            layout, decision = choose_layout(S, policy)
        if layout == "csr":
            S = csr_from_bitmask(packed.S_values.data, packed.S_bitmask, shape)
        elif layout == "dense" and S is None:
            S = unpack_bitmask(packed.S_values.data, packed.S_bitmask, shape)
    elif packed.layout == "dense":
        S = packed.S.data
        dense_dtype = S.dtype
        layout, decision = choose_layout(S, policy, sparse_dtype)
        if layout == "bitmask":
            bits = BitmaskMatrix.from_dense(S, sparse_dtype)
    if decision is not None:
        decision["nnz"] = int(spec.get("nnz", 0))
    _release_replaced(packed, S, bits)
    if packed.U is None and layout == "dense":
        mod = _plain_module(spec.get("kind", "linear"), S, bias)
        mod.capllm_decision = decision
        return mod
    ref = packed.U if packed.U is not None else packed.S_values if packed.layout == "bitmask" else packed.S
    with torch.device("meta"):
        mod = LowRankSparseLinear(shape[1], shape[0], 0, False, False, dtype=ref.dtype)
    if packed.U is not None:
        mod.U = nn.Parameter(packed.U.data, requires_grad=False)
        mod.V = nn.Parameter(packed.V.data, requires_grad=False)
    if layout == "bitmask":
        mod.set_packed(bits, dense_dtype)
        mod.kernel_max_tokens = decision.get("kernel_max_tokens", mod.kernel_max_tokens)
        mod.kernel_isa = decision.get("kernel_isa", mod.kernel_isa)
    elif S is not None:
        mod.S = nn.Parameter(S, requires_grad=False)
        if layout == "csr":
            mod.set_sparse_layout("csr")
    if bias is not None:
        mod.bias = nn.Parameter(bias, requires_grad=False)
    mod.decision = decision
    return mod


def _value_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype) and name in VALUE_DTYPES:
        return name
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if dt not in VALUE_DTYPES:
        raise CapllmError(f"sparse_dtype {name!r} is not one of float32, bfloat16, float16")
    return dt


def load_compressed(path: str | os.PathLike, device: str | torch.device = "cpu", execution: str = "auto",
                    sparse_dtype: str | torch.dtype | None = None):
    """Load a capllm compressed model directory → ``(model, tokenizer or None)``.

    ``execution``: ``auto`` (bitmask kernel, dense or CSR per layer, measured once: see
    :mod:`capllm.format.execution`), ``dense``, ``csr`` or ``kernel``.
    :func:`capllm.format.describe_execution` says what was chosen and why.
    ``sparse_dtype``: store the non-zeros of the layers that run the bitmask kernel as
    ``bfloat16`` or ``float16`` (fewer bytes read per token; each value rounded once to that
    dtype, products still accumulate in fp32); default: the checkpoint's dtype.
    """
    import transformers
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    check_policy(execution)
    sparse_dtype = _value_dtype(sparse_dtype)
    path = Path(path).expanduser()
    section = read_section(path)
    verify(path, section)
    hf_logging.set_verbosity_error()
    config = AutoConfig.from_pretrained(path)
    arch = (getattr(config, "architectures", None) or [None])[0]
    base = getattr(transformers, arch, None) if arch else None
    if not isinstance(base, type):
        raise CapllmError(f"{path}: architecture {arch!r} is not a transformers model class: cannot rebuild it")
    cls = modeling_capllm.capllm_class(base, verify=False)
    dtype = getattr(torch, section.get("dtype", "float32"))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CapllmError(f"could not load {path}: {first[:200]}") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [k for k in info.get("missing_keys", []) if k not in tied]
    problems = [("missing", missing), ("unexpected", list(info.get("unexpected_keys", []))), ("mis-shaped", [m[0] if isinstance(m, tuple) else m for m in info.get("mismatched_keys", [])])]
    for what, keys in problems:
        if keys:
            raise CapllmError(f"{path}: {len(keys)} {what} tensor(s) in the checkpoint, e.g. {sorted(keys)[0]}: the files do not match config.json")
    model.__class__ = base  # the subclass only built the module tree for loading
    model.to(torch.device(device))
    for spec in section.get("modules", []):
        parent, _, child = spec["name"].rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, _runnable(getattr(owner, child), spec, execution, sparse_dtype))
    trim_heap()  # the packed modules and probe buffers just freed: give the heap back to the OS
    model.eval()
    tokenizer = None
    if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
