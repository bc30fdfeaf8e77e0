"""capllm.data"""
