"""capllm.allocate"""
