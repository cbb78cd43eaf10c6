"""Tensor parallelism inside a mesh: sharded Llama layers over torch.distributed."""
