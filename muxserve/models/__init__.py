"""Llama-family models (Llama, Qwen2, Mistral): config parsing, layers, weight loading.

`hf_config` is torch-free (the planner reads it); the rest needs torch.
"""
