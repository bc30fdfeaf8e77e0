"""capllm.decompose"""
