"""Where a compressed layer's prefill time goes, per matrix shape: dense ``F.linear`` against the
packed layer's ``linear_prefill`` (unpack a row block into a reused buffer, then the GEMM) and the
unpack alone, at 50 % density, 512 tokens, 1 and 2 threads, in one process (medians, interleaved
is not needed: each case runs back to back on the same tensors).

    python benchmarks/prefill_breakdown.py [--tokens 512] [--shapes 576x576,192x576,1536x576,576x1536]

Prints one line per case; on a shared machine two identical GEMMs on different tensors already
differ by a few per cent, so read differences below ~4 % as noise.
"""

from __future__ import annotations

import argparse
import time

import torch

from capllm.kernels import BitmaskMatrix, cpu_build
from capllm.kernels.bitmask import _workspace


def _median_ms(f, reps: int = 20) -> float:
    f(); f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--shapes", default="576x576,192x576,1536x576,576x1536")
    a = ap.parse_args()
    ops = cpu_build.load()
    if ops is None:
        raise SystemExit(f"no CPU kernel: {cpu_build.unavailable_reason()}")
    torch.manual_seed(0)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for spec in a.shapes.split(","):
            m, n = (int(v) for v in spec.split("x"))
            W = torch.randn(m, n) * (torch.rand(m, n) < 0.5)
            P = BitmaskMatrix.from_dense(W)
            x = torch.randn(a.tokens, n)
            ws = _workspace(m * n)[: m * n].view(m, n)
            with torch.inference_mode():
                dense = _median_ms(lambda: torch.nn.functional.linear(x, W))
                prefill = _median_ms(lambda: P.linear_prefill(x))
                unpack = _median_ms(lambda: ops.unpack_rows(P.values, P.bitmask, P.row_ptr, n, 0, m, ws, 0))
            print(f"threads {threads} {m}x{n}: dense {dense:.3f} ms, prefill {prefill:.3f} ms ({prefill / dense:.3f}x), "
                  f"unpack {unpack:.3f} ms ({unpack / dense:.3f} of dense)", flush=True)


if __name__ == "__main__":
    main()
