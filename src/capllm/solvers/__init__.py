"""Numerical solvers that the methods and CAP's allocation share; they know no method and no model.

* :mod:`capllm.solvers.obs` — the OBS (SparseGPT) prune-and-reconstruct solve.
"""
