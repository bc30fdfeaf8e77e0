"""capllm — post-training compression of LLMs: low-rank + sparse with global allocation (CAP).

Library entry points::

    model, tok = capllm.load_model("smollm2-135m")
    result = capllm.compress(model, tok, capllm.CompressConfig(method="wanda", ratio=0.5))
    ppl = capllm.evaluate_perplexity(model, tok, capllm.PerplexityConfig(dataset="wikitext2"))
    capllm.save_compressed(model, "out/", tokenizer=tok, result=result)   # really smaller on disk
    model, tok = capllm.load_compressed("out/")                            # or capllm.load_model("out/")
"""

from capllm.data.calibration import CalibrationConfig
from capllm.errors import CapllmError
from capllm.eval.perplexity import PerplexityConfig, evaluate_perplexity
from capllm.format import describe_execution, load_compressed, save_compressed
from capllm.models.loader import load_model
from capllm.pipeline import CompressConfig, compress

__all__ = ["CalibrationConfig", "CapllmError", "CompressConfig", "PerplexityConfig", "compress", "describe_execution", "evaluate_perplexity", "load_compressed", "load_model", "save_compressed"]
