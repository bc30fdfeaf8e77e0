"""The CPU decode kernel of this checkout against the kernel of another git revision, in one process.

    python benchmarks/decode_ab.py --against HEAD~1 [--density 0.5] [--rounds 21] [--out ab.json]

Builds ``src/capllm/kernels/bitmask_cpu.cpp`` as it was at ``--against`` under another operator
namespace (``capllm_bitmask_ab``, in ``$CAPLLM_CACHE/kernels/ab-<rev>``), then for each SmolLM2
decode shape, value dtype, token count and thread count interleaves dense ``F.linear`` (fp32
weights), the other revision's ``spmv`` and this checkout's, ``--rounds`` times, and prints each
kernel's speed-up over dense (median of the rounds). Every case cycles through distinct copies
of its matrix (≥ `--copies-mb`, 96 MB by default: set it above the L3), as a decode step does, so the numbers are DRAM-bound.
A timing on a shared machine is an upper bound on the time; the ratios are taken in one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from interleave import interleaved_runs

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "src/capllm/kernels/bitmask_cpu.cpp"
SHAPES = {"q/o_proj": (576, 576), "gate/up_proj": (1536, 576), "down_proj": (576, 1536), "k/v_proj": (192, 576)}


def build_other(rev: str, serial: bool = False):
    """torch.ops.capllm_bitmask_ab: the kernel source of ``rev``, built once per revision (``serial``:
    without OpenMP, as every build before 2026-12-03 was, so its at::parallel_for runs on one thread)."""
    from capllm.kernels import cpu_build
    from capllm.utils import cache_dir

    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True)
    if sha.returncode:
        raise SystemExit(f"decode_ab: '{rev}' is not a revision of this repository ({sha.stderr.strip()})")
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{sha.stdout.strip()}:{SOURCE}"], capture_output=True, text=True)
    if src.returncode:
        raise SystemExit(f"decode_ab: {rev} has no {SOURCE}")
    text = src.stdout.replace("TORCH_LIBRARY(capllm_bitmask,", "TORCH_LIBRARY(capllm_bitmask_ab,").replace("TORCH_LIBRARY_IMPL(capllm_bitmask,", "TORCH_LIBRARY_IMPL(capllm_bitmask_ab,")
    build = cache_dir() / "kernels" / f"ab-{sha.stdout.strip()}{'-serial' if serial else ''}"
    build.mkdir(parents=True, exist_ok=True)
    cpp = build / "bitmask_ab.cpp"
    cpp.write_text(text)
    cpu_build.build_library("capllm_bitmask_ab", cpp, build, openmp=not serial)
    return torch.ops.capllm_bitmask_ab, sha.stdout.strip() + ("-serial" if serial else "")


def interleaved(fns: dict, rounds: int) -> dict:
    """Median seconds per call of each function, the functions taking turns every round."""
    return {k: sorted(v)[len(v) // 2] for k, v in interleaved_runs(fns, rounds).items()}


def main() -> None:
    from capllm.kernels import BitmaskMatrix, cpu_build

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", required=True, help="git revision whose kernel to compare with")
    ap.add_argument("--density", type=float, action="append", default=None, help="fraction of entries kept (repeatable; default 0.5)")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--tokens", type=int, action="append", default=None, help="batch sizes (repeatable; default 1 and 4)")
    ap.add_argument("--threads", type=int, action="append", default=None, help="intra-op thread counts (repeatable; default 1 and 2)")
    ap.add_argument("--copies-mb", type=float, default=96.0,
                    help="MB of distinct dense copies each case cycles through (default 96; set it above the L3 of the machine)")
    ap.add_argument("--isa", choices=["auto", *cpu_build.ISA_NAMES.values()], default="auto", help="kernel path of both builds (default auto: the best this CPU has)")
    ap.add_argument("--against-serial", action="store_true", help="build --against without OpenMP (one thread whatever the thread count)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    ours = cpu_build.load()
    if ours is None:
        raise SystemExit(f"decode_ab: no CPU kernel here: {cpu_build.unavailable_reason()}")
    other, sha = build_other(args.against, args.against_serial)
    head = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    isa = {name: code for code, name in cpu_build.ISA_NAMES.items()}.get(args.isa, 0)  # the ops' isa argument; 0 = auto
    rows = []
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            for density in args.density or [0.5]:
                for name, (m, n) in SHAPES.items():
                    copies = max(2, int(args.copies_mb * 1e6 // (m * n * 4)))
                    dense = [torch.randn(m, n, generator=g) * (torch.rand(m, n, generator=g) < density) for _ in range(copies)]
                    packs = [BitmaskMatrix.from_dense(w, dtype) for w in dense]
                    for T in args.tokens or [1, 4]:
                        x = torch.randn(T, n, generator=g)
                        for threads in args.threads or [1, 2]:
                            torch.set_num_threads(threads)
                            t = interleaved({
                                "dense": lambda: [F.linear(x, w) for w in dense],
                                "against": lambda: [other.spmv(x, p.values, p.bitmask, p.row_ptr, isa) for p in packs],
                                "this": lambda: [ours.spmv(x, p.values, p.bitmask, p.row_ptr, isa) for p in packs],
                            }, args.rounds)
                            row = {"values": str(dtype).removeprefix("torch."), "density": density, "matrix": name, "shape": [m, n], "tokens": T, "threads": threads,
                                   "copies": copies, "dense_us": round(t["dense"] / copies * 1e6, 1),
                                   f"speedup_{sha}": round(t["dense"] / t["against"], 3), f"speedup_{head}": round(t["dense"] / t["this"], 3)}
                            rows.append(row)
                            print(f"{row['values']:8s} density {density} {name:12s} {m}x{n} T={T} {threads}t  dense {row['dense_us']:.0f} us  "
                                  f"{sha} {row[f'speedup_{sha}']:.2f}x  {head} {row[f'speedup_{head}']:.2f}x", flush=True)
    if args.out:
        doc = {"against": sha, "this": head, "rounds": args.rounds, "copies_mb": args.copies_mb, "isa_requested": args.isa, "threads": args.threads or [1, 2], "isa": cpu_build.best_isa(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(args.out)


if __name__ == "__main__":
    sys.exit(main())
