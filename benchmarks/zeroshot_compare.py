"""Zero-shot results of several models side by side, and each one's margin over a reference.

    python benchmarks/zeroshot_compare.py --ref sparsegpt \
        dense=benchmarks/results/zeroshot/smollm2-135m-dense-limit500.json \
        cap=benchmarks/results/zeroshot/smollm2-135m-cap-0.5-limit500-2026-12-03.json \
        sparsegpt=benchmarks/results/zeroshot/smollm2-135m-sparsegpt-0.5-limit500-2026-12-03.json \
        [--out table.md]

Each argument is ``label=result.json`` of ``capllm eval`` or ``capllm compress --tasks``. Prints
(and with ``--out`` writes) a markdown table: the primary metric of the CAP paper's eight tasks,
their unweighted mean with its binomial standard error, the mean without BoolQ, and each row's
difference from ``--ref`` in points with the standard error of that difference,
``sqrt(se_a² + se_b²)`` — conservative, because both models answer the same seeded documents
(per-document answers are not stored, so the paired error cannot be computed). Task sets that
differ between rows (a different ``--limit`` or seed) are refused: the means would not compare.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "grid"))
from summarize import PAPER, zs_margin, zs_scores, zs_summary  # noqa: E402


def load(spec: str) -> tuple[str, dict]:
    label, sep, path = spec.partition("=")
    if not sep:
        raise SystemExit(f"zeroshot_compare: '{spec}' is not label=result.json")
    try:
        r = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"zeroshot_compare: cannot read {path}: {e}")
    if not (r.get("zeroshot") or {}).get("tasks"):
        raise SystemExit(f"zeroshot_compare: {path} has no zero-shot results (run with --tasks)")
    return label, r


def sample_key(r: dict) -> dict[str, tuple]:
    z = r["zeroshot"]["tasks"]
    return {t: (z[t]["n"], z[t].get("seed"), z[t].get("limit")) for t in PAPER if t in z}


def table(rows: list[tuple[str, dict]], ref: str | None) -> str:
    keys = {label: sample_key(r) for label, r in rows}
    first = next(iter(keys.values()))
    for label, k in keys.items():
        if k != first:
            raise SystemExit(f"zeroshot_compare: {label} was evaluated on other documents than {rows[0][0]} "
                             f"(tasks, n, seed or limit differ); compare runs made with the same --limit and --seed")
    scores = {label: zs_scores(r) for label, r in rows}
    if ref is not None and ref not in scores:
        raise SystemExit(f"zeroshot_compare: --ref {ref} is not one of {', '.join(scores)}")
    summary = {label: zs_summary(s) for label, s in scores.items()}
    tasks = [t for t in PAPER if t in first]
    head = ["model", "ppl", *tasks, "mean", "mean w/o boolq"] + ([f"− {ref} (points ± s.e.)"] if ref else [])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows:
        s, z = scores[label], summary[label]
        ppl = (r.get("perplexity") or {}).get("value")
        cells = [label, f"{ppl:.2f}" if ppl else "–", *(f"{100 * s[t][0]:.1f}" for t in tasks),
                 f"{100 * z['mean']:.2f} ± {100 * z['se']:.2f}", f"{100 * z['mean_without_boolq']:.2f}"]
        if ref:
            d, se = zs_margin(z, summary[ref])
            cells.append("–" if label == ref else f"{d:+.2f} ± {se:.2f}")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="label=result.json")
    ap.add_argument("--ref", help="label of the row the others are compared with")
    ap.add_argument("--out", help="also write the table here")
    a = ap.parse_args()
    md = table([load(s) for s in a.results], a.ref)
    print(md, end="")
    if a.out:
        Path(a.out).write_text(md)


if __name__ == "__main__":
    main()
