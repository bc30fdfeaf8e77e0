"""Everything per model that CAP computes, on disk in the run's work directory.

CAP compares candidates across the whole model, but nothing of the whole model is ever in memory
at once: each stage writes its per-matrix (or per-block) result here and the next stage reads
them back one matrix at a time. Layout of ``ROOT`` (``<work dir>/cap``)::

    stats/block_<i>.safetensors   per linear of block i: ``<name>.adiag`` = diag E[x xᵀ] (n,),
                                  ``<name>.vcv`` = (v_kᵀ E[x xᵀ] v_k)_k over its Stage 1 directions,
                                  ``<name>.gram`` (only for the policy's ``loss=recon``)
    acts/block_<i>.safetensors    the dense inputs of block i for every calibration window
    acts/final.safetensors        the dense output of the last block (``fisher`` scores only)
    grad.safetensors              ``<name>`` = E[g²] (m,) of every linear's output gradient
    efisher/block_<i>.safetensors ``<name>`` = E_t[g_i² x_j²] (m, n), bf16: the entries' diagonal
                                  empirical Fisher (``entry_score=diag`` only; deleted once the
                                  scores are written)
    scores/<name>.safetensors     ``key`` = importance / cost of each candidate (fp32, pool order);
                                  metadata: rank, nnz, direction_cost
    keep/<name>.safetensors       ``keep`` (packed bits) — the final mask of that matrix
    keep-uniform/<name>.safetensors  the uniform split's mask (the allocation guard's alternative)
    stages/<stage>.json           a finished stage and what it reported

Files are written to a temporary name and renamed, so a killed run leaves only complete files
and resumes by skipping them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capllm.engine.checkpoint import load_tensors, save_tensors_atomic
from capllm.utils import write_json_atomic


class CapStore:
    """``dist``: on several processes each rank keeps its own share of the activations
    (``acts/…rank<r>of<N>``); everything else is written by rank 0 and read by all."""

    def __init__(self, root: str | Path, dist=None) -> None:
        self.root = Path(root)
        self.dist = dist

    # --- stages -------------------------------------------------------------------------------
    def stage(self, name: str) -> dict | None:
        p = self.root / "stages" / f"{name}.json"
        return json.loads(p.read_text()) if p.exists() else None

    def finish_stage(self, name: str, info: dict[str, Any] | None = None) -> None:
        write_json_atomic(self.root / "stages" / f"{name}.json", info or {})

    # --- statistics ---------------------------------------------------------------------------
    def _block(self, kind: str, i: int) -> Path:
        return self.root / kind / f"block_{i:04d}.safetensors"

    def save_block_stats(self, i: int, stats: dict[str, dict[str, torch.Tensor]]) -> None:
        save_tensors_atomic(self._block("stats", i), {f"{name}.{k}": t for name, d in stats.items() for k, t in d.items()})

    def has_block_stats(self, i: int) -> bool:
        return self._block("stats", i).exists()

    def block_stats(self, i: int) -> dict[str, dict[str, torch.Tensor]]:
        tensors, _ = load_tensors(self._block("stats", i))
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            name, _, part = key.rpartition(".")
            out.setdefault(name, {})[part] = t
        return out

    def _acts(self, i: int | None) -> Path:
        path = self.root / "acts" / "final.safetensors" if i is None else self._block("acts", i)
        d = self.dist
        return path.with_suffix(f".rank{d.rank}of{d.world}.safetensors") if d is not None and d.enabled else path

    def save_inputs(self, i: int | None, hidden: list[torch.Tensor]) -> None:
        save_tensors_atomic(self._acts(i), {"hidden": torch.stack(hidden)})

    def inputs(self, i: int | None) -> list[torch.Tensor]:
        return list(load_tensors(self._acts(i))[0]["hidden"].unbind(0))

    def drop_inputs(self) -> None:
        for p in sorted((self.root / "acts").glob("*.safetensors")):
            p.unlink(missing_ok=True)

    def save_grad(self, G: dict[str, torch.Tensor]) -> None:
        save_tensors_atomic(self.root / "grad.safetensors", G)

    def grad(self) -> dict[str, torch.Tensor]:
        return load_tensors(self.root / "grad.safetensors")[0]

    def save_entry_fisher(self, i: int, F: dict[str, torch.Tensor]) -> None:
        save_tensors_atomic(self._block("efisher", i), {k: v.to(torch.bfloat16) for k, v in F.items()})

    def entry_fisher(self, i: int) -> dict[str, torch.Tensor] | None:
        path = self._block("efisher", i)
        return load_tensors(path)[0] if path.exists() else None

    def drop_entry_fisher(self) -> None:
        for p in sorted((self.root / "efisher").glob("*.safetensors")):
            p.unlink(missing_ok=True)

    # --- scores and masks ---------------------------------------------------------------------
    def score_path(self, name: str) -> Path:
        return self.root / "scores" / f"{name}.safetensors"

    def save_key(self, name: str, key: torch.Tensor, rank: int, nnz: int, direction_cost: int) -> None:
        save_tensors_atomic(self.score_path(name), {"key": key}, {"rank": str(rank), "nnz": str(nnz), "direction_cost": str(direction_cost)})

    def key(self, name: str) -> torch.Tensor:
        return load_tensors(self.score_path(name))[0]["key"]

    def key_meta(self, name: str) -> dict[str, int]:
        from safetensors import safe_open

        with safe_open(str(self.score_path(name)), framework="pt") as f:
            meta = f.metadata() or {}
        return {k: int(v) for k, v in meta.items()}

    def save_keep(self, name: str, keep: torch.Tensor, kind: str = "keep") -> None:
        """``kind``: ``keep`` (the final mask) or another candidate mask set (``keep-uniform``)."""
        bits = torch.from_numpy(np.packbits(keep.to(torch.bool).numpy()))
        save_tensors_atomic(self.root / kind / f"{name}.safetensors", {"keep": bits}, {"size": str(keep.numel())})

    def keep(self, name: str, kind: str = "keep") -> torch.Tensor:
        tensors, meta = load_tensors(self.root / kind / f"{name}.safetensors")
        if "size" not in meta:  # written unpacked (a run started by an earlier version)
            return tensors["keep"].to(torch.bool)
        return torch.from_numpy(np.unpackbits(tensors["keep"].numpy(), count=int(meta["size"])).astype(bool))
