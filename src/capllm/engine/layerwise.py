"""The layer-wise pipeline every layer-wise method runs through (DESIGN §3).

1. capture the inputs of block 0 for every calibration window (:mod:`capllm.engine.capture`);
2. for each block, on the compute device:
   a. hook every linear and feed its inputs to the method's ``LayerCompressor.add_batch``
      while the block runs on the (already compressed-upstream) inputs;
   b. ``compress`` each linear and write the result into the model;
   c. re-run the compressed block so the next block sees compressed outputs;
3. activations live on CPU between blocks; only the current block sits on the device, cast to
   the compute dtype (fp32 on a CPU, ``--dtype`` on a GPU) and cast back to the dtype it is
   stored in afterwards — the model is never held in a wider dtype than its checkpoint;
4. with a :class:`~capllm.engine.checkpoint.PassCheckpoint` every finished block (its new
   weights and the next block's inputs) is on disk, so a killed pass resumes after the last one;
   the finished block's tensors are then views of that file's memory map
   (:func:`map_finished_block`), so the compressed model lives on disk, not in host RAM.

A statistics-only pass (``modifies_weights = False``: CAP's Stage 1 statistics) writes nothing
and feeds each block the dense outputs of the one before, from the same forward.

Methods that need no calibration data skip the forward passes entirely.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from capllm.engine.capture import block_to, capture_block_inputs, cast_floats, release_block, stored_dtype
from capllm.engine.distributed import solve_cost
from capllm.errors import CapllmError
from capllm.models.layers import find_decoder_blocks

if TYPE_CHECKING:
    from capllm.engine.checkpoint import PassCheckpoint
    from capllm.engine.context import CompressionContext
    from capllm.methods.base import Method


@contextlib.contextmanager
def blocks_detached(model: nn.Module, path: str) -> Iterator[None]:
    """Temporarily take the decoder ModuleList out of ``model`` (to move the rest on its own)."""
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    blocks = getattr(parent, child)
    setattr(parent, child, nn.ModuleList())
    try:
        yield
    finally:
        setattr(parent, child, blocks)


def place_outside_blocks(model: nn.Module, device: torch.device) -> None:
    """Put embeddings, final norm and head on ``device``; leave the blocks where they are."""
    path, _ = find_decoder_blocks(model)
    with blocks_detached(model, path):
        model.to(device)


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_finite(t: torch.Tensor, where: str) -> None:
    if not torch.isfinite(t).all():
        raise CapllmError(f"non-finite activations after {where}: the model or its compression produced NaN/Inf")


def default_finish_block(ctx: "CompressionContext", method, index: int, handles: list, comps: dict) -> dict:
    """Compress every linear of the block from its accumulated statistics.

    On several processes each linear is compressed by its owner (:meth:`Dist.owners`, balanced
    by ``(m + n) n²`` for an ``m × n`` weight: the Hessian-based solves invert an ``n × n`` matrix
    and sweep ``m`` rows through it) and the result broadcast, so every rank ends the block with
    the same weights."""
    dist = ctx.dist
    owners = dist.owners([solve_cost(h.shape) for h in handles])
    out = {}
    for j, h in enumerate(handles):
        if owners[j] == dist.rank:
            out[h.name] = comps[h.name].compress(h.weight_copy())
        comps[h.name].free()
    if dist.enabled:
        for j, h in enumerate(handles):
            mine = out.get(h.name)
            out[h.name] = dist.broadcast_object(None if mine is None else _on_cpu(mine), src=owners[j])
    return out


def _on_cpu(cw):
    from dataclasses import replace

    return replace(cw, **{k: getattr(cw, k).cpu() for k in ("S", "mask", "U", "V") if getattr(cw, k) is not None})


def _reduce_statistics(dist, method, handles: list, comps: dict) -> None:
    """Every rank's share of the calibration windows into one set of statistics."""
    if not dist.enabled:
        return
    for h in handles:
        reduce = getattr(comps[h.name], "reduce", None)
        if reduce is None:
            raise CapllmError(f"method {method.name} cannot run on several processes yet (its statistics have no reduce): run it without torchrun")
        reduce(dist)


def _restore(ctx: "CompressionContext", handles: list, parts: dict, records: dict) -> None:
    from capllm.engine.context import LayerRecord
    from capllm.engine.compressed import CompressedWeight

    for h in handles:
        if h.name not in parts:
            continue
        t = parts[h.name]
        ctx.apply(h, CompressedWeight(S=t.get("S"), mask=t.get("mask"), U=t.get("U"), V=t.get("V")), record=False)
        r = records[h.name]
        ctx.records[h.name] = LayerRecord(r["name"], tuple(r["shape"]), r["kept_params"], r["rank"], r["nnz"], r.get("info", {}))


def map_finished_block(handles: list, parts: dict[str, dict[str, torch.Tensor]]) -> int:
    """Point each linear's written tensors at their memory-mapped copy on disk; returns bytes moved.

    ``parts`` (from :meth:`~capllm.engine.checkpoint.PassCheckpoint.map_block`) holds the same
    bytes the module holds — the file was written from them, in the dtype the block is stored
    in — so only where the bytes live changes: the anonymous copy is freed (or, for a weight
    written into the input checkpoint's map, its copied-on-write pages are dropped) and the
    mapped pages are clean page cache, given back after each later use (:func:`release_block`).
    A tensor whose shape, dtype or device differs, and GPT-2 ``Conv1D`` weights (stored
    transposed), stay where they are.
    """
    from capllm.format.modules import LowRankSparseLinear
    from capllm.utils import release_host_pages

    moved = 0
    for h in handles:
        mine = parts.get(h.name)
        if not mine or h.conv1d:
            continue
        attrs = {"U": "U", "V": "V", "S": "S"} if isinstance(h.module, LowRankSparseLinear) else {"S": "weight"}
        for part, attr in attrs.items():
            p, t = getattr(h.module, attr, None), mine.get(part)
            if p is None or t is None or p.device.type != "cpu" or p.shape != t.shape or p.dtype != t.dtype:
                continue
            old = p.data
            p.data = t
            release_host_pages([old])
            moved += t.numel() * t.element_size()
            del old
    return moved


def _tune(ctx, block, i: int, handles: list, results: dict, hidden, targets, run_block, global_ids, n_total: int, tune, device, compute) -> None:
    """Block tuning (:mod:`capllm.engine.block_tune`) of block ``i``, in fp32 whatever the compute
    dtype; the trained values go back into ``results`` (what the checkpoint saves) and the
    record onto the block's first linear."""
    from capllm.engine.block_tune import read_back, tune_block

    if compute != torch.float32:
        block_to(block, device, torch.float32)
    record = tune_block(block, handles, results, hidden, targets, lambda s, x: run_block(s, x, torch.float32), global_ids, n_total, tune, i, ctx.dist)
    if compute != torch.float32:
        block_to(block, device, compute)
    read_back(handles, results)
    first = next((h for h in handles if results.get(h.name) is not None), None)
    if first is not None:
        ctx.records[first.name].info["block_tune"] = record


@torch.no_grad()
def run_layerwise(ctx: "CompressionContext", method: "Method", checkpoint: "PassCheckpoint | None" = None,
                  on_block_inputs: "Callable[[int, list[torch.Tensor]], None] | None" = None, desc: str | None = None) -> None:
    """One pass of ``method`` over the decoder, block by block (see the module docstring).

    ``method`` gives ``layer_compressor(handle)`` and may define ``finish_block(ctx, i, handles,
    comps) -> {name: CompressedWeight}`` (default: ``compress`` each linear) and
    ``modifies_weights = False`` (a statistics-only pass: nothing is written, and the next block
    sees the *dense* outputs of this one, taken from the same forward). ``checkpoint`` makes the
    pass resumable block by block; ``on_block_inputs(i, hidden)`` sees the inputs of block ``i``
    (and, with ``i = len(blocks)``, the final hidden states) before they are replaced.
    """
    model, device = ctx.model, ctx.device
    compute = ctx.compute_dtype
    path, blocks = find_decoder_blocks(model)
    by_block: dict[int, list] = {}
    for h in ctx.linears:
        by_block.setdefault(h.block_index, []).append(h)
    modifies = getattr(method, "modifies_weights", True)
    finish = getattr(method, "finish_block", None)
    label = desc or f"{method.name}: blocks"
    tune = getattr(method, "block_tune", None)
    tune = tune if modifies and tune is not None and tune.active else None
    if tune is not None and ctx.calibration is not None and not tune.fits(len(ctx.calibration.windows)):
        why = (f"{len(ctx.calibration.windows)} calibration windows leave none held out for block tuning "
               f"(it holds out every {tune.hold_out}th): the default block tuning is skipped; pass --nsamples ≥ {tune.hold_out} to tune")
        if tune.strict:
            raise tune.too_few(len(ctx.calibration.windows))
        if ctx.dist.is_main:
            print(f"capllm: {why}", file=sys.stderr)
        ctx.extra["block_tune"] = {"skipped": why}
        tune = None
    dense_stream = tune is not None and tune.target == "dense"

    if not method.needs_calibration:
        for h in tqdm(ctx.linears, desc=f"{method.name}: layers", disable=not ctx.progress):
            comp = method.layer_compressor(h)
            ctx.apply(h, comp.compress(h.weight_copy()))
            comp.free()
        return

    if ctx.calibration is None:
        raise CapllmError(f"method {method.name} needs calibration data")
    storage = torch.device("cpu")
    dist = ctx.dist
    windows = ctx.calibration.windows
    global_ids = list(range(len(windows)))[dist.shard(len(windows))] if dist.enabled else list(range(len(windows)))
    if dist.enabled:  # data parallel: this rank's contiguous share of the windows
        if finish is not None and not getattr(method, "distributed_finish", False):
            raise CapllmError(f"method {method.name} cannot run on several processes yet: run it without torchrun")
        windows = windows[dist.shard(len(windows))]
        if len(windows) == 0:
            raise CapllmError(f"{len(ctx.calibration.windows)} calibration windows for {dist.world} ranks: use --nsamples ≥ the number of ranks")
    with ctx.timer.stage("capture"):
        place_outside_blocks(model, device)
        inputs = capture_block_inputs(model, blocks, windows, device, storage)
    n = len(inputs.hidden)
    inputs.hidden = [x.to(compute) for x in inputs.hidden]
    dense_hidden = [x.clone() for x in inputs.hidden] if dense_stream else None
    start = 0
    if checkpoint is not None and (done := checkpoint.done()) >= 0:
        for i in range(done + 1):
            if modifies:
                parts, records = checkpoint.load_block(i)
                _restore(ctx, by_block.get(i, []), parts, records)
                del parts
                map_finished_block(by_block.get(i, []), checkpoint.map_block(i))
        if done + 1 < len(blocks):
            inputs.hidden = checkpoint.load_hidden(done)
            if dense_stream:
                dense_hidden = checkpoint.load_hidden(done, "dense")
        start = done + 1
        if ctx.progress and start:
            print(f"capllm: {label.split(':')[0]}: resuming after block {done} of {len(blocks)} ({checkpoint.dir})", file=sys.stderr)

    bar = tqdm(total=len(blocks), initial=start, desc=label, disable=not ctx.progress, unit="block")
    for i in range(start, len(blocks)):
        block = blocks[i]
        keep_dtype = stored_dtype(block)
        block_to(block, device, compute)
        args, kwargs = inputs.per_block[i]

        def run_block(s, x, dtype=compute):
            return _block_output(block(x.to(device, dtype), *cast_floats(args[s], device, dtype), **cast_floats(kwargs[s], device, dtype)))

        if on_block_inputs is not None:
            on_block_inputs(i, inputs.hidden)
        targets = [run_block(s, dense_hidden[s]).to(storage) for s in range(n)] if dense_stream else None
        handles = by_block.get(i, [])
        comps = {h.name: method.layer_compressor(h) for h in handles}
        hooks = [
            h.module.register_forward_hook(lambda mod, inp, out, c=comps[h.name]: c.add_batch(inp[0].detach(), out.detach()))
            for h in handles
        ]
        outs = []
        try:
            for s in range(n):
                out = run_block(s, inputs.hidden[s])
                if not modifies:
                    _check_finite(out, f"block {i}")
                    outs.append(out.to(storage))
                elif tune is not None and not dense_stream:  # local targets: the dense block on these inputs
                    outs.append(out.to(storage))
        finally:
            for hk in hooks:
                hk.remove()
        _reduce_statistics(dist, method, handles, comps)
        results = finish(ctx, i, handles, comps) if finish is not None else default_finish_block(ctx, method, i, handles, comps)
        del comps
        if modifies:
            for h in handles:
                if results.get(h.name) is not None:
                    ctx.apply(h, results[h.name])
            if tune is not None:
                targets = targets if dense_stream else outs
                with ctx.timer.stage("block_tune"):
                    _tune(ctx, block, i, handles, results, inputs.hidden, targets, run_block, global_ids, len(ctx.calibration.windows), tune, device, compute)
                outs = []
                if dense_stream:
                    dense_hidden = targets
                del targets
            for s in range(n):
                out = run_block(s, inputs.hidden[s])
                _check_finite(out, f"block {i}")
                outs.append(out.to(storage))
        block_to(block, storage, keep_dtype)
        release_block(block)
        inputs.hidden = outs
        if on_block_inputs is not None and i == len(blocks) - 1:
            on_block_inputs(len(blocks), inputs.hidden)
        if checkpoint is not None:
            # every rank's share of the next inputs first; then rank 0's block file and state
            if i + 1 < len(blocks):
                checkpoint.save_hidden(i, inputs.hidden)
                if dense_stream:
                    checkpoint.save_hidden(i, dense_hidden, "dense")
            dist.barrier()
            if modifies and dist.is_main:
                done_w = {h.name: results[h.name] for h in handles if results.get(h.name) is not None}
                checkpoint.save_block(i, done_w, {name: ctx.records[name].as_record() for name in done_w}, dtype=keep_dtype)
                del done_w
            if dist.is_main:
                checkpoint.mark(i, len(blocks))
            dist.barrier()
            checkpoint.drop_hidden(i - 1)
            if modifies:
                del results
                map_finished_block(handles, checkpoint.map_block(i))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        bar.update(1)
    bar.close()
    model.to(storage)
