"""capllm.decompose — CAP Stage 1: robust PCA ``W = L + S`` of every weight matrix.

    from capllm.decompose import rpca, RPCAConfig
    res = rpca(W)                      # RPCAResult: U, sigma, V, S, iterations, residual, history
    L = res.L()

    from capllm.decompose import decompose_model, load_decomposition, iter_decompositions
"""

from capllm.decompose.cache import decompose_in_memory, decompose_model, iter_decompositions, load_decomposition, save_decomposition
from capllm.decompose.rpca import RPCAConfig, RPCAResult, rpca, rpca_batched

__all__ = ["RPCAConfig", "RPCAResult", "decompose_in_memory", "decompose_model", "iter_decompositions", "load_decomposition", "rpca", "rpca_batched", "save_decomposition"]
