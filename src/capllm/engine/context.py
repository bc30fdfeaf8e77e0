"""What a method sees while it compresses a model, and what it leaves behind.

:class:`CompressionContext` holds the model, the calibration windows, the compute device and
the per-layer records. ``apply`` writes a :class:`~capllm.methods.base.CompressedWeight` into
the model: a sparse-only result stays an ordinary (masked) linear layer; a result with a
low-rank part replaces the module by a
:class:`~capllm.format.modules.LowRankSparseLinear`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from capllm.data.calibration import CalibrationSet
from capllm.format.modules import LowRankSparseLinear
from capllm.engine.compressed import CompressedWeight
from capllm.engine.distributed import SINGLE, Dist
from capllm.models.layers import LinearHandle, find_linears
from capllm.utils import StageTimer, release_host_pages


def default_compute_dtype(device) -> torch.dtype:
    """fp32 on a CPU (no fast bf16 there), bf16 on a GPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


@dataclass
class LayerRecord:
    name: str
    shape: tuple[int, int]
    kept_params: int
    rank: int
    nnz: int
    info: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        m, n = self.shape
        return {"name": self.name, "shape": [m, n], "dense_params": m * n, "kept_params": self.kept_params,
                "kept_fraction": round(self.kept_params / (m * n), 6), "rank": self.rank, "nnz": self.nnz, **self.info}

    def as_record(self) -> dict[str, Any]:
        """The fields themselves (for checkpoints; :meth:`as_dict` is the result.json row)."""
        return {"name": self.name, "shape": list(self.shape), "kept_params": self.kept_params, "rank": self.rank, "nnz": self.nnz, "info": self.info}


class CompressionContext:
    def __init__(self, model: nn.Module, calibration: CalibrationSet | None, device: torch.device, progress: bool = True, timer: StageTimer | None = None,
                 compute_dtype: torch.dtype | None = None, work_dir: str | Path | None = None, dist: Dist = SINGLE) -> None:
        self.model = model
        self.dist = dist  # the process group this compression is divided over (one process: SINGLE)
        self.compute_dtype = compute_dtype or default_compute_dtype(device)
        # where per-model state lives while the run is going (statistics, scores, finished
        # blocks); a killed run started again with the same work_dir resumes from it
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.calibration = calibration
        self.device = torch.device(device)
        self.progress = progress
        self.timer = timer or StageTimer()
        self.linears: list[LinearHandle] = find_linears(model)
        self.records: dict[str, LayerRecord] = {}
        self.extra: dict[str, Any] = {}  # method-level results (allocation, loss curves, ...)

    @property
    def dense_linear_params(self) -> int:
        return sum(h.numel for h in self.linears)

    def checkpoint(self, name: str):
        """The resumable checkpoint of pass ``name`` in the work directory (``None`` without one)."""
        from capllm.engine.checkpoint import PassCheckpoint

        return PassCheckpoint(self.work_dir / "passes", name, self.dist) if self.work_dir is not None else None

    def apply(self, handle: LinearHandle, cw: CompressedWeight, record: bool = True) -> None:
        """Write ``cw`` into the model in place of ``handle``'s weight and record it."""
        m, n = handle.shape
        if cw.U is None:
            if cw.S is None:
                raise ValueError(f"{handle.name}: empty compression result")
            handle.set_weight(cw.S)
        else:
            bias = handle.bias.data if handle.bias is not None else None
            old = handle.module.weight
            dev, dt = old.device, old.dtype
            new = LowRankSparseLinear.from_factors(
                cw.U.to(dev, dt), cw.V.to(dev, dt), None if cw.S is None else cw.S.to(dev, dt), bias
            )
            parent_name, _, child = handle.name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, new)
            handle.module = new
            release_host_pages([old.data])  # the dense weight's pages of the checkpoint map
            del old
        if record:
            self.records[handle.name] = LayerRecord(handle.name, (m, n), cw.kept_params(), cw.rank, cw.nnz, dict(cw.info))

    def record_untouched(self) -> None:
        for h in self.linears:
            m, n = h.shape
            self.records[h.name] = LayerRecord(h.name, (m, n), m * n, 0, m * n)
