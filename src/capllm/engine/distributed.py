"""Several processes, one compression: the process group and what the engine asks of it.

Launched by ``torchrun`` (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` in the environment), capllm
joins one ``torch.distributed`` process group — NCCL when the ranks compute on GPUs, gloo on
CPUs — and every rank computes on its own device (``cuda:LOCAL_RANK``). The work is divided
two ways (DESIGN §3, the layer-wise engine):

* **data parallel** — rank ``r`` holds the calibration windows :meth:`Dist.shard` gives it (a
  contiguous slice, in order) and their activations, so memory per rank falls with the number of
  ranks; a layer's input statistics are running means, combined exactly as one process would
  combine them (:func:`reduce_means`: ``Σ_r t_r · mean_r / Σ_r t_r``, summed in float64);
* **work parallel** — the matrices of a block are compressed by their owners
  (:meth:`Dist.owners`, balanced by each matrix's cost) from the same reduced statistics, and every result is
  broadcast, so all ranks hold the same model after each block.

CAP (:mod:`capllm.methods.cap`): its statistics pass, the block-wise backward pass (each rank
backpropagates its windows; ``E[g²]`` combined like the moments), Stage 1's robust PCA (a
block's matrices balanced by SVD cost, into the one cache; rank 0 writes the manifest) and the refit are
divided this way; the scores and the selection read and write per-model files and run on
rank 0 while the others wait at a barrier.

The perplexity evaluator gathers per-window losses, each computed exactly as alone (a window's
loss does not depend on the others), so its figure equals the single-process one bit for bit.
Outputs (result.json, saved models, the work directory's block files and ``state.json``) are
written by rank 0; each rank writes its own shard of the next block's inputs.

:class:`Dist` with ``world = 1`` (the default everywhere) is the single process: every helper is
then a no-op, so callers need no branches.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch

from capllm.errors import CapllmError


def svd_cost(shape: tuple[int, int]) -> float:
    """The work of an SVD of an ``m × n`` matrix, ``m n min(m, n)``: how Stage 1's robust PCA
    divides a block among ranks (:meth:`Dist.owners`)."""
    m, n = shape
    return float(m * n * min(m, n))


def solve_cost(shape: tuple[int, int]) -> float:
    """The work of a Hessian-based layer-wise solve of an ``m × n`` weight, ``(m + n) n²`` (an
    ``n × n`` inverse and ``m`` rows swept through it): how the engine divides a block's
    compressions among ranks."""
    m, n = shape
    return float((m + n) * n * n)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (the first ``n % world`` ranks get one more)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def owners(self, costs: list[float]) -> list[int]:
        """The rank that computes each item of a block, given each item's cost: longest first,
        each to the rank with the least work so far (ties: the lower item index, the lower rank).
        Round robin gave SmolLM2's rank 0 two of a block's three 576 × 1536 matrices (2.42 : 1.42
        by SVD cost); this gives 2.0 : 1.83. Every rank computes the same list from the same
        shapes, and an item's result does not depend on which rank computes it."""
        if self.world == 1:
            return [0] * len(costs)
        load = [0.0] * self.world
        out = [0] * len(costs)
        for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            out[j] = r
            load[r] += costs[j]
        return out

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.world, "backend": self.backend or "none"}

    # --- collectives (no-ops for one process) ---------------------------------------------

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (on the tensor's device: NCCL needs CUDA, gloo takes either)."""
        if self.enabled:
            dev = t.device
            if self.backend == "nccl" and dev.type != "cuda":
                g = t.to(f"cuda:{self.local_rank}")
                torch.distributed.all_reduce(g)
                t.copy_(g.to(dev))
            else:
                torch.distributed.all_reduce(t)
        return t

    def broadcast_object(self, obj: Any, src: int) -> Any:
        """``obj`` of rank ``src`` on every rank (tensors inside are moved to CPU first)."""
        if not self.enabled:
            return obj
        box = [obj if self.rank == src else None]
        torch.distributed.broadcast_object_list(box, src=src, device=self._object_device())
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def _object_device(self):
        return torch.device(f"cuda:{self.local_rank}") if self.backend == "nccl" else None


SINGLE = Dist()


def reduce_means(dist: Dist, tokens: int, means: list[torch.Tensor | None]) -> int:
    """Combine per-rank running means over ``tokens`` tokens into the mean over all ranks' tokens,
    in place (each summed in float64); returns the total token count."""
    if not dist.enabled:
        return tokens
    count = dist.all_reduce_(torch.tensor([float(tokens)], dtype=torch.float64))
    total = float(count.item())
    for t in means:
        if t is None:
            continue
        wide = t.to(torch.float64) * tokens
        dist.all_reduce_(wide)
        t.copy_((wide / max(total, 1.0)).to(t.dtype))
    return int(total)


def from_env(device_type: str = "cpu", timeout_s: float | None = None) -> Dist:
    """The process group ``torchrun`` asked for, joined; :data:`SINGLE` when not launched by it.

    ``device_type`` is where the ranks compute: ``cuda`` → NCCL (one GPU per rank, ``LOCAL_RANK``),
    otherwise gloo. ``timeout_s`` bounds every collective (default 30 min, or
    ``CAPLLM_DIST_TIMEOUT``): a rank that died makes the others fail with a clear error instead
    of waiting for ever.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    try:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as exc:
        raise CapllmError(f"WORLD_SIZE={world} but RANK/LOCAL_RANK are missing or invalid ({exc}): launch with torchrun") from None
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available() or local >= torch.cuda.device_count():
            raise CapllmError(f"rank {rank}: LOCAL_RANK {local} has no GPU ({torch.cuda.device_count()} visible): use --nproc-per-node ≤ the GPU count, or --device cpu")
        torch.cuda.set_device(local)
    timeout = float(timeout_s if timeout_s is not None else os.environ.get("CAPLLM_DIST_TIMEOUT", 1800))
    if not torch.distributed.is_initialized():
        try:
            torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
        except Exception as exc:  # rendezvous timeout, unreachable master, ...
            raise CapllmError(f"rank {rank}: could not join the process group ({str(exc).splitlines()[0][:160]}): check MASTER_ADDR/MASTER_PORT and that every rank started") from None
    return Dist(rank=rank, world=world, local_rank=local, backend=backend)
