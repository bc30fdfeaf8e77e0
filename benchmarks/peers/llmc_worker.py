"""Run one llm-compressor one-shot pruning job (runs INSIDE the peers virtual environment).

    python llmc_worker.py --model DIR --calib calib.json --method wanda|sparsegpt --sparsity 0.5 --out DIR

``calib.json`` holds capllm's calibration windows (``{"input_ids": [[...], ...]}``), so the peer
sees exactly the tokens capllm calibrates on. The pruned model is written as a plain Hugging Face
checkpoint (``save_compressed=False``: dense tensors with the zeros in place) plus
``peer_run.json`` (versions, recipe, wall time). Nothing here imports capllm.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--method", choices=["wanda", "sparsegpt"], required=True)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--dampening", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

    torch.set_num_threads(a.threads)
    ids = json.loads(Path(a.calib).read_text())["input_ids"]
    n, seqlen = len(ids), len(ids[0])
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * seqlen for _ in ids]})
    # every decoder-block linear; the LM head stays dense (as in capllm)
    common = dict(sparsity=a.sparsity, mask_structure="0:0", targets=["Linear"], ignore=["re:.*lm_head"])
    if a.method == "wanda":
        recipe = WandaPruningModifier(**common)
    else:
        recipe = SparseGPTModifier(**common, block_size=a.block_size, dampening_frac=a.dampening)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.model)
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=n, max_seq_length=seqlen,
            shuffle_calibration_samples=False, batch_size=1)
    wall = time.perf_counter() - t0
    out = Path(a.out)
    model.save_pretrained(out, save_compressed=False)
    tok.save_pretrained(out)
    (out / "peer_run.json").write_text(json.dumps({
        "tool": f"llm-compressor {version('llmcompressor')}", "method": a.method, "ratio": a.sparsity,
        "recipe": {"modifier": type(recipe).__name__, **{k: v for k, v in recipe.model_dump().items() if k in
                   ("sparsity", "mask_structure", "targets", "ignore", "block_size", "dampening_frac")}},
        "calibration": {"nsamples": n, "seqlen": seqlen, "file": str(Path(a.calib).resolve())},
        "time_s": {"compress": round(wall, 3)},
        "versions": {p: version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")},
        "threads": torch.get_num_threads(),
    }, indent=2, default=str))


if __name__ == "__main__":
    main()
