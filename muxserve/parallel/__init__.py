"""Tensor parallelism inside a mesh: sharded layers of any registered family over
torch.distributed."""
