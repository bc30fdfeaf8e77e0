"""Resumable position of one layer-wise pass, kept in the run's work directory.

A pass over the decoder (:func:`capllm.engine.layerwise.run_layerwise`) finishes one block at a
time. After block ``i`` it writes, each file to a temporary name and renamed:

    DIR/block_<i>.safetensors   what the pass wrote into block i: per linear ``<name>.S``,
                                ``<name>.mask`` (packed bits), ``<name>.U``, ``<name>.V`` (those
                                that exist), in the dtype the model holds the block in,
                                its :class:`~capllm.engine.context.LayerRecord` in the metadata
    DIR/hidden_<i>.safetensors  the inputs of block ``i + 1`` for every calibration window
    DIR/state.json              ``{"done": i, ...}`` — written last; then ``hidden_<i-1>`` goes

so a run killed anywhere (``kill -9``, power loss) restarts after the last block whose
``state.json`` entry was written, with the same block inputs and the same weights as an
uninterrupted run: the result is bit-identical. Block files of finished blocks are kept (they
are the compressed blocks written out as they finish); only the newest hidden states are.

Once a block file is written the model's tensors of that block are pointed at the file's memory
map (:meth:`PassCheckpoint.map_block`, :func:`capllm.engine.layerwise.map_finished_block`): a
finished block then occupies page cache the kernel can drop — and the engine drops it after each
later use — instead of anonymous memory, so a compressed model never has to fit in host RAM.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from capllm.errors import CapllmError
from capllm.utils import write_json_atomic


STREAMS = ("hidden", "dense")  # the activation streams a pass can keep between blocks


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """``safetensors`` file written to a temporary name and renamed (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise CapllmError(f"could not write {path} ({exc.strerror or exc}): free disk space in {path.parent} and run the same command again to resume") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # a truncated / foreign file
        raise CapllmError(f"{path} is unreadable ({str(exc).splitlines()[0][:120]}): remove the work directory {path.parent.parent} to start over") from exc


class PassCheckpoint:
    """Per-block progress of the pass ``name`` under ``root`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, name: str, dist=None) -> None:
        self.dir = Path(root) / name
        self.name = name
        self.dist = dist  # several processes: each keeps its own share of the hidden states

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    def done(self) -> int:
        """Index of the last finished block (-1: none)."""
        if not self.state_path.exists():
            return -1
        try:
            return int(json.loads(self.state_path.read_text())["done"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CapllmError(f"{self.state_path} is corrupt ({exc}): remove the work directory {self.dir.parent} to start over") from exc

    def block_path(self, i: int) -> Path:
        return self.dir / f"block_{i:04d}.safetensors"

    def save_block(self, i: int, weights: dict[str, Any], records: dict[str, dict], dtype: torch.dtype | None = None) -> None:
        """``weights``: ``{linear name: CompressedWeight}`` written into block ``i``.

        Values are kept in ``dtype`` — the dtype the model holds the block in, so restoring gives
        the same bytes as the uninterrupted run while a bf16 model's checkpoint is half the size —
        and masks as packed bits (row-major, ``numpy.packbits``).
        """
        tensors, shapes = {}, {}
        for name, cw in weights.items():
            for part in ("S", "U", "V"):
                t = getattr(cw, part)
                if t is not None:
                    tensors[f"{name}.{part}"] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
            if cw.mask is not None:
                tensors[f"{name}.mask"] = torch.from_numpy(np.packbits(cw.mask.cpu().numpy().reshape(-1)))
                shapes[name] = list(cw.mask.shape)
        save_tensors_atomic(self.block_path(i), tensors, {"records": json.dumps(records), "names": json.dumps(list(weights)), "mask_shapes": json.dumps(shapes)})

    def load_block(self, i: int) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict]]:
        """``({name: {"S"|"mask"|"U"|"V": tensor}}, {name: record dict})`` of finished block ``i``."""
        path = self.block_path(i)
        if not path.exists():
            raise CapllmError(f"{path} is missing although {self.state_path} says block {i} is done: remove the work directory {self.dir.parent} to start over")
        tensors, meta = load_tensors(path)
        parts: dict[str, dict[str, torch.Tensor]] = {n: {} for n in json.loads(meta.get("names", "[]"))}
        shapes = json.loads(meta.get("mask_shapes", "{}"))
        for key, t in tensors.items():
            name, _, part = key.rpartition(".")
            if part == "mask" and name in shapes:  # packed (unpacked bool: an earlier version's checkpoint)
                m, n = shapes[name]
                t = torch.from_numpy(np.unpackbits(t.numpy(), count=m * n).astype(bool).reshape(m, n))
            parts.setdefault(name, {})[part] = t
        return parts, json.loads(meta.get("records", "{}"))

    def map_block(self, i: int) -> dict[str, dict[str, torch.Tensor]]:
        """``{name: {"S"|"U"|"V": tensor}}`` of finished block ``i`` as views of the file's
        (private, copy-on-write) memory map — nothing is read until used; masks are left out."""
        path = self.block_path(i)
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = [k for k in f.keys() if not k.endswith(".mask")]
                tensors = {k: f.get_tensor(k) for k in keys}
        except Exception as exc:
            raise CapllmError(f"{path} is unreadable ({str(exc).splitlines()[0][:120]}): remove the work directory {path.parent.parent} to start over") from exc
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            name, _, part = key.rpartition(".")
            parts.setdefault(name, {})[part] = t
        return parts

    def _hidden_path(self, i: int, stream: str = "hidden") -> Path:
        d = self.dist
        if d is not None and d.enabled:  # a resume must use the same number of ranks (checked in load_hidden)
            return self.dir / f"{stream}_{i:04d}.rank{d.rank}of{d.world}.safetensors"
        return self.dir / f"{stream}_{i:04d}.safetensors"

    def drop_hidden(self, i: int) -> None:
        """Remove this process's inputs of block ``i + 1`` (superseded once block ``i + 1`` is marked
        done), of every stream."""
        if i >= 0:
            for stream in STREAMS:
                self._hidden_path(i, stream).unlink(missing_ok=True)

    def save_hidden(self, i: int, hidden: list[torch.Tensor], stream: str = "hidden") -> None:
        """The inputs of block ``i + 1``: ``hidden`` is the compressed model's stream, ``dense``
        the dense model's (kept only for block tuning towards dense targets)."""
        save_tensors_atomic(self._hidden_path(i, stream), {"hidden": torch.stack(hidden)})

    def load_hidden(self, i: int, stream: str = "hidden") -> list[torch.Tensor]:
        path = self._hidden_path(i, stream)
        if not path.exists():
            others = sorted(p.name for p in self.dir.glob(f"{stream}_{i:04d}*"))
            if others and others[0] != path.name:
                raise CapllmError(f"{self.dir} was written by a run on another number of processes ({others[0]}): resume with the same torchrun --nproc-per-node, or remove the work directory {self.dir.parent}")
            raise CapllmError(f"{path} is missing although {self.state_path} says block {i} is done: remove the work directory {self.dir.parent} to start over")
        return list(load_tensors(path)[0]["hidden"].unbind(0))

    def mark(self, i: int, nblocks: int) -> None:
        write_json_atomic(self.state_path, {"pass": self.name, "done": i, "blocks": nblocks})
        self.drop_hidden(i - 1)
