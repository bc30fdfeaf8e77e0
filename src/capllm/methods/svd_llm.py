"""``svd-llm``: truncation-aware data whitening + SVD (Wang et al. 2024, arXiv 2403.07378).

With ``H = E[x xᵀ] = XXᵀ/N`` and its lower Cholesky factor ``Lc`` (``Lc Lcᵀ = H``), the layer output
error of any ``Ŵ`` is ``‖(W − Ŵ)X‖²_F / N = ‖(W − Ŵ)Lc‖²_F``. Its rank-``r`` minimiser is closed-form:
``W·Lc = U diag(σ) Qᵀ``, ``Ŵ = U_r diag(σ_r) Q_rᵀ Lc⁻¹``, with loss ``Σ_{i>r} σ_i²`` — so truncating the
smallest whitened singular values is exactly truncating the smallest output-error contributions.
Stored as ``U = U_r√σ_r``, ``V = Lc⁻ᵀ Q_r√σ_r`` (a triangular solve, fp64).

``H`` that is not numerically positive definite (dead or collinear inputs) gets diagonal jitter,
``1e-10·mean(diag H)`` growing tenfold until Cholesky succeeds; the jitter is recorded per layer.
The reference instead shifts by ``−λ_min + 1e-6``; both only touch the null space of ``X``.

Statistics come from the shared sequential engine (each block sees the outputs of the already
compressed blocks before it — the reference's ``run_low_resource`` mode). Rank rule as ``svd``:
``r = ⌊B/(m + n)⌋``, ``B = ⌊(1 − ρ)mn⌋``. Not included: SVD-LLM's optional LoRA / sequential
low-rank parameter update after truncation.
"""

from __future__ import annotations

import torch

from capllm.methods.base import CompressedWeight, Method, StatsCompressor, register
from capllm.methods.lowrank import whitened_svd, whitening_factor
from capllm.methods.svd import budget_rank, low_rank_result


class _SVDLLMCompressor(StatsCompressor):
    STATS = {"sq": False, "gram": True}

    def compress(self, weight: torch.Tensor) -> CompressedWeight:
        r = budget_rank(weight, self.method.ratio)
        Lc, jitter = whitening_factor(self.stats.gram)
        U, V, s = whitened_svd(weight.float(), Lc, r)
        s2 = s.double().pow(2)
        info = {"whitening_jitter": jitter,
                "rel_output_error": round(float(s2[r:].sum().sqrt() / s2.sum().sqrt().clamp_min(1e-30)), 6)}
        return low_rank_result(weight, U, V, info)


@register
class SVDLLM(Method):
    name = "svd-llm"
    description = "SVD of W·chol(E[xxᵀ]) then un-whiten: closed-form output-error-optimal rank r (Wang et al. 2024)"

    def layer_compressor(self, handle):
        return _SVDLLMCompressor(handle.shape[1], handle.module.weight.device, self)
