"""Where a compressed layer's prefill time goes, per matrix shape, as shares of dense ``F.linear``:
the packed layer's ``linear_prefill`` (unpack a row block of ``S (+ U Vᵀ)`` into a reused buffer,
then the GEMM) at rank 0 and rank ``--rank``, the unpack alone one row at a time and four rows at a
time (beside a plain ``copy_`` of the dense ``S``, the same bytes written), and the low-rank part fused into the unpack against the unpack + MKL ``addmm`` at ranks
1 / 4 / 8 / 16. 50 % density, 512 tokens, 1 and 2 threads, one process; every case of a shape is
interleaved over ``--rounds`` rounds and the fastest run of each is reported (on a shared VM two
identical GEMMs on different tensors differ by a few per cent: read smaller differences as noise).

    python benchmarks/prefill_breakdown.py [--tokens 512] [--shapes 576x576,192x576,1536x576,576x1536] [--rank 16]
"""

from __future__ import annotations

import argparse

import torch

from capllm.kernels import BitmaskMatrix, cpu_build
from capllm.kernels.bitmask import _ISA, _workspace
from interleave import interleaved_runs


def _fastest_ms(cases: dict, rounds: int) -> dict[str, float]:
    return {k: min(v) * 1e3 for k, v in interleaved_runs(cases, rounds, warmup=2).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--shapes", default="576x576,192x576,1536x576,576x1536")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=25)
    a = ap.parse_args()
    ops = cpu_build.load()
    if ops is None:
        raise SystemExit(f"no CPU kernel: {cpu_build.unavailable_reason()}")
    isa = cpu_build.best_isa()
    rowwise, blocked = _ISA[f"{isa}-rowwise"] if isa != "scalar" else 1, _ISA[isa]
    print(f"ISA {isa}, {a.tokens} tokens, 50 % density; shares of dense F.linear (fastest of {a.rounds} interleaved rounds)")
    torch.manual_seed(0)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for spec in a.shapes.split(","):
            m, n = (int(v) for v in spec.split("x"))
            S = torch.randn(m, n) * (torch.rand(m, n) < 0.5)
            P = BitmaskMatrix.from_dense(S)
            x = torch.randn(a.tokens, n)
            ws = _workspace(m * n)[: m * n].view(m, n)
            lr = {r: (torch.randn(m, r), torch.randn(n, r)) for r in sorted({1, 4, 8, 16, a.rank})}

            def unpack(code, U=None, Vt=None):
                return ops.unpack_rows(P.values, P.bitmask, P.row_ptr, n, 0, m, ws, code, U, Vt)

            cases = {"dense": lambda: torch.nn.functional.linear(x, S),
                     "prefill r0": lambda: P.linear_prefill(x),
                     f"prefill r{a.rank}": lambda: P.linear_prefill(x, *lr[a.rank]),
                     "unpack 1 row": lambda: unpack(rowwise),
                     "unpack 4 rows": lambda: unpack(blocked),
                     "copy_ of dense S": lambda: ws.copy_(S)}  # the same bytes written: the unpack's floor
            for r, (U, V) in lr.items():
                Vt = V.t().contiguous()
                cases[f"fused r{r}"] = lambda U=U, Vt=Vt: unpack(blocked, U, Vt)
                cases[f"addmm r{r}"] = lambda U=U, V=V: unpack(blocked).addmm_(U, V.t())
            with torch.inference_mode():
                t = _fastest_ms(cases, a.rounds)
            dense = t.pop("dense")
            print(f"threads {threads} {m}x{n}: dense {dense:.3f} ms | " + " | ".join(f"{k} {v / dense:.3f}" for k, v in t.items()), flush=True)


if __name__ == "__main__":
    main()
