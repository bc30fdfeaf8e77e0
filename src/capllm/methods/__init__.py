"""Compression methods, registered by name (``capllm methods`` lists them)."""

from capllm.methods import cap, dense, magnitude, sparsegpt, wanda  # noqa: F401  (registration)
from capllm.methods.base import REGISTRY, CompressedWeight, Method, Structure, get_method, register

__all__ = ["REGISTRY", "CompressedWeight", "Method", "Structure", "get_method", "register"]
