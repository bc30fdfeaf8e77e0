"""capllm.models"""
