"""Kernels that multiply with capllm's packed weights without unpacking them.

* :class:`BitmaskMatrix` (``bitmask.py``) — the bitmask layout in memory and its products;
* ``bitmask_cpu.cpp`` / ``cpu_build.py`` — the CPU kernel (AVX-512 / AVX2 / scalar), built on
  first use, optional;
* ``bitmask_triton.py`` — the CUDA kernel (Triton), optional;
* ``reference.py`` — pure-torch packing and unpacking: the fallback and the test oracle.

This package sits below ``format`` and imports nothing else from capllm but ``utils``.
"""

from capllm.kernels.bitmask import PAD, VALUE_DTYPES, BitmaskMatrix, kernel_backend, kernel_unavailable_reason

__all__ = ["PAD", "VALUE_DTYPES", "BitmaskMatrix", "kernel_backend", "kernel_unavailable_reason"]
