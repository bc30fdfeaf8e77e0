"""The trust_remote_code class against capllm's own loader on one saved compressed model: greedy
decode tokens/s and 512-token prefill ms, in one process, interleaved rounds (issue 15).

Cases: ``capllm`` (``capllm.load_compressed``, execution ``auto``), ``remote`` (this checkout's
``modeling_capllm.py``, the class ``from_pretrained(dir, trust_remote_code=True)`` builds, with
capllm importable) and, with ``--against COMMIT``, ``remote@COMMIT`` (that commit's file; the
copy a model saved then carries). The classes are built from the files directly (no SHA check of
the directory's own copy), so the model directory is only read. Logits of a 16-token prompt are
compared first: the remote classes must match capllm's loader.

    python benchmarks/remote_code.py DIR [--against 439117e] [--threads 1] [--rounds 3] [--tokens 64] [--out JSON]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import transformers

from interleave import interleaved_runs

REPO = Path(__file__).resolve().parents[1]


def module_from(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def remote_model(modeling, folder: Path):
    cfg = json.loads((folder / "config.json").read_text())
    base = getattr(transformers, cfg["architectures"][0])
    return modeling.capllm_class(base, verify=False).from_pretrained(str(folder)).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="a directory capllm.save_compressed wrote")
    ap.add_argument("--against", help="also time this commit's modeling_capllm.py")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64, help="greedy decode tokens per run (after a 16-token prompt)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import capllm
    from capllm.format import modeling_capllm

    models = {"capllm": capllm.load_compressed(a.model)[0], "remote": remote_model(modeling_capllm, a.model)}
    if a.against:
        src = subprocess.run(["git", "-C", str(REPO), "show", f"{a.against}:src/capllm/format/modeling_capllm.py"], capture_output=True, text=True, check=True).stdout
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "modeling_old.py").write_text(src)
            models[f"remote@{a.against}"] = remote_model(module_from(Path(tmp) / "modeling_old.py", "modeling_old"), a.model)
    g = torch.Generator().manual_seed(0)
    prompt, long = torch.randint(0, 1000, (1, 16), generator=g), torch.randint(0, 1000, (1, 512), generator=g)
    with torch.inference_mode():
        ref = models["capllm"](prompt).logits
        diffs = {k: (m(prompt).logits - ref).abs().max().item() for k, m in models.items() if k != "capllm"}
    paths = Counter((x.capllm_decision["layout"], x.capllm_decision.get("kernel_isa")) for x in models["remote"].modules()
                    if getattr(x, "capllm_decision", None) is not None and "layout" in x.capllm_decision)
    print(f"max |logits - capllm's| on a 16-token prompt: {diffs}; remote layers by (layout, path): {dict(paths)}")

    def decode(m):
        with torch.inference_mode():
            out = m(prompt, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(a.tokens):
                out = m(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def prefill(m):
        with torch.inference_mode():
            m(long)

    dec = interleaved_runs({k: (lambda m=m: decode(m)) for k, m in models.items()}, a.rounds)
    pre = interleaved_runs({k: (lambda m=m: prefill(m)) for k, m in models.items()}, a.rounds)
    rows = {k: {"decode_tok_s": round((a.tokens + 1) / statistics.median(dec[k]), 2), "prefill_512_ms": round(1e3 * statistics.median(pre[k]), 1),
                "decode_runs_s": [round(x, 3) for x in dec[k]], "prefill_runs_s": [round(x, 3) for x in pre[k]]} for k in models}
    base = rows["capllm"]
    print(f"| loader | decode tok/s | ÷ capllm | prefill 512 ms | ÷ capllm |\n|---|---|---|---|---|")
    for k, r in rows.items():
        print(f"| {k} | {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / base['decode_tok_s']:.3f} | {r['prefill_512_ms']:.0f} | {r['prefill_512_ms'] / base['prefill_512_ms']:.3f} |")
    if a.out:
        rec = {"model": str(a.model), "threads": a.threads, "rounds": a.rounds, "tokens": a.tokens, "against": a.against,
               "logits_max_abs_diff": diffs, "remote_paths": {f"{k[0]}/{k[1]}": v for k, v in paths.items()}, "results": rows,
               "capllm_commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
               "date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0], "torch": torch.__version__}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
