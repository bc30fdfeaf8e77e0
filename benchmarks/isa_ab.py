"""The CPU decode kernel's AVX2 path against its AVX-512 path, in one process, DRAM-bound.

    python benchmarks/isa_ab.py [--rounds 11] [--threads 1] [--out isa.json]

On a CPU with AVX-512 both vector paths of ``torch.ops.capllm_bitmask.spmv`` run (the AVX-512
one places 16 values with ``vexpandps``, the AVX2 one 8 with a permutation table): for each
shape, density and value dtype, dense ``F.linear`` (fp32) and the two paths take turns
``--rounds`` times over distinct copies of the matrix (≥ ``--copies-mb``, as in a decode step),
and the medians are printed as speed-ups over dense and as the AVX2 / AVX-512 time ratio. This
is what the load-time probe (:func:`capllm.format.execution.probe_kernel`) decides per layer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from interleave import interleaved_runs

SHAPES = {"q/o 576x576": (576, 576), "gate/up 1536x576": (1536, 576), "down 576x1536": (576, 1536), "qwen gate/up 8960x1536": (8960, 1536)}


def main() -> None:
    from capllm.kernels import BitmaskMatrix, cpu_build

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, action="append", default=None, help="intra-op thread counts (repeatable; default 1)")
    ap.add_argument("--density", type=float, action="append", default=None, help="fraction kept (repeatable; default 0.3, 0.5, 0.7)")
    ap.add_argument("--copies-mb", type=float, default=96.0, help="distinct copies per case, in MB of dense fp32 (set it above the L3)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    ops = cpu_build.load()
    if ops is None or cpu_build.best_isa() != "avx512":
        raise SystemExit(f"isa_ab: needs the CPU kernel on an AVX-512 CPU (kernel: {cpu_build.best_isa() or cpu_build.unavailable_reason()})")
    torch.manual_seed(0)
    rows = []
    for threads in a.threads or [1]:
        torch.set_num_threads(threads)
        for name, (m, n) in SHAPES.items():
            for dens in a.density or [0.3, 0.5, 0.7]:
                copies = max(2, int(a.copies_mb * (1 << 20)) // (m * n * 4))
                Ws = [torch.randn(m, n) * (torch.rand(m, n) < dens) for _ in range(copies)]
                x = torch.randn(1, n)
                for dt in (torch.float32, torch.bfloat16):
                    packs = [BitmaskMatrix.from_dense(W, dt) for W in Ws]
                    fns = {"dense": lambda: [F.linear(x, W) for W in Ws]}
                    for isa, code in (("avx2", 2), ("avx512", 3)):
                        fns[isa] = lambda code=code: [ops.spmv(x, p.values, p.bitmask, p.row_ptr, code) for p in packs]
                    t = {k: sorted(v)[len(v) // 2] for k, v in interleaved_runs(fns, a.rounds).items()}
                    row = {"matrix": name, "shape": [m, n], "density": dens, "values": str(dt).removeprefix("torch."), "threads": threads, "copies": copies,
                           "dense_us": round(t["dense"] / copies * 1e6, 2), "speedup_avx2": round(t["dense"] / t["avx2"], 3),
                           "speedup_avx512": round(t["dense"] / t["avx512"], 3), "avx2_over_avx512_time": round(t["avx2"] / t["avx512"], 3)}
                    rows.append(row)
                    print(f"{name:24s} density {dens:.1f} {row['values']:8s} {threads}t  dense {row['dense_us']:7.1f} us  avx2 {row['speedup_avx2']:.2f}x  "
                          f"avx512 {row['speedup_avx512']:.2f}x  avx2/avx512 time {row['avx2_over_avx512_time']:.2f}", flush=True)
    if a.out:
        from capllm.results import source_commit

        a.out.write_text(json.dumps({"capllm_commit": source_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": a.rounds,
                                     "copies_mb": a.copies_mb, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
