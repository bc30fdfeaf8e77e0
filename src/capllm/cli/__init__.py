"""Command-line interface (``capllm``)."""
