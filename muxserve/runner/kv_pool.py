"""The unified KV pool's memory: one byte buffer per device, viewed per model."""

from __future__ import annotations

import torch

from muxserve.kv.layout import KVLayout


class KVPool:
    """`num_blocks * block_bytes` bytes; each model sees it as its own K/V block array.

    A block is `block_bytes` long whatever the model; model m views it as
    `(2, tokens_per_block_m, head_dim_m)` of its dtype, with any bytes past that unused.
    """

    def __init__(
        self, num_blocks: int, block_bytes: int, device: torch.device, shared: bool = False
    ) -> None:
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self.buffer = torch.zeros(num_blocks * block_bytes, dtype=torch.uint8, device=device)
        if shared and device.type == "cpu":
            self.buffer.share_memory_()  # visible to worker processes

    @classmethod
    def from_buffer(cls, buffer: torch.Tensor, block_bytes: int) -> KVPool:
        """A pool over an existing byte buffer: a worker process's view of the engine's pool."""
        pool = cls.__new__(cls)
        pool.num_blocks = buffer.numel() // block_bytes
        pool.block_bytes = block_bytes
        pool.buffer = buffer
        return pool

    def view(self, layout: KVLayout, dtype: torch.dtype) -> torch.Tensor:
        """The pool as `(num_blocks, 2, tokens_per_block, head_dim)` of `dtype` (K at 0, V at 1)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        if itemsize != layout.dtype_bytes or self.block_bytes % itemsize:
            raise ValueError(f"layout dtype bytes {layout.dtype_bytes} do not match {dtype}")
        if layout.block_bytes != self.block_bytes:
            raise ValueError(
                f"layout block_bytes {layout.block_bytes} != the pool's {self.block_bytes}"
            )
        typed = self.buffer.view(dtype)
        tpb, hd = layout.tokens_per_block, layout.head_dim
        stride = self.block_bytes // itemsize
        return typed.as_strided((self.num_blocks, 2, tpb, hd), (stride, tpb * hd, hd, 1))
