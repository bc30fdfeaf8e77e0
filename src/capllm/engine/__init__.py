"""capllm.engine"""
