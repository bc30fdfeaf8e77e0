"""Numerical solvers that the methods and CAP's allocation share; they know no method and no model.

* :mod:`capllm.solvers.obs` — the OBS (SparseGPT) prune-and-reconstruct solve;
* :mod:`capllm.solvers.support_lstsq` — the exact least-squares values on a fixed support (batched CG).
"""
