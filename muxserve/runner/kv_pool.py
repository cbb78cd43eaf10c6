"""The unified KV pool's memory: one byte buffer per device, viewed per model; and its size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from muxserve.config import CPU_KV_POOL_BYTES, EngineConfig
from muxserve.kv.layout import KVLayout
from muxserve.kv.pool_size import check_pool_fits, host_available_bytes, pool_bytes_from_memory


@dataclass(frozen=True)
class PoolSizing:
    """How big each device's pool is: `pool_bytes` when the config sets it; otherwise on a GPU
    what `gpu_memory_utilization` of it leaves once the weights are loaded, on a CPU
    `CPU_KV_POOL_BYTES`. Executors size the pool after loading the models, with this."""

    block_bytes: int
    pool_bytes: int | None = None  # per device
    gpu_memory_utilization: float = 0.9

    @classmethod
    def of(cls, engine: EngineConfig) -> PoolSizing:
        return cls(engine.block_bytes, engine.kv_pool_bytes, engine.gpu_memory_utilization)

    def num_blocks(self, devices: Sequence[torch.device]) -> int:
        """Blocks of each device's pool: one count for all, the least any device has room for.

        Every rank of a tensor-parallel model uses the same block ids in its own pool.
        """
        pool = self.pool_bytes
        if pool is None:
            if devices[0].type == "cuda":
                pool = min(self._free_on(d) for d in devices)
            else:
                pool = CPU_KV_POOL_BYTES
        elif devices[0].type == "cuda":
            for d in devices:
                check_pool_fits(pool, 1, torch.cuda.mem_get_info(d)[0], str(d))
        else:  # every rank's pool is in host memory
            check_pool_fits(pool, len(devices), host_available_bytes(), "this host")
        return pool // self.block_bytes

    def _free_on(self, device: torch.device) -> int:
        free, total = torch.cuda.mem_get_info(device)
        used = total - free  # by anyone: this process's weights, worker contexts, other clients
        return pool_bytes_from_memory(
            total, used, self.gpu_memory_utilization, self.block_bytes, str(device)
        )


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
