"""capllm.eval"""
