"""The compressed model: modules, storage format, save and load.

* :class:`LowRankSparseLinear` — ``y = U'(V'ᵀx) + S x + b`` with ``S`` dense or CSR;
* :func:`save_compressed` / :func:`load_compressed` — the on-disk format (``config.json`` with a
  ``capllm`` section, safetensors shards, values + packed bitmask for ``S``, checksums);
* :func:`save_dense` — a plain Hugging Face checkpoint of a compressed model;
* :func:`describe_execution` — which kernel each compressed layer runs and why.
"""

from capllm.format.execution import describe_execution
from capllm.format.load import load_compressed
from capllm.format.modules import LowRankSparseLinear
from capllm.format.save import save_compressed, save_dense, write_compressed, write_dense

__all__ = ["LowRankSparseLinear", "describe_execution", "load_compressed", "save_compressed", "save_dense", "write_compressed", "write_dense"]
