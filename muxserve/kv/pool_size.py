"""How many bytes of a device's memory the KV pool may take, once the weights are loaded.

Torch-free arithmetic, so it is tested exactly on any machine; the executor reads the device's
numbers (`torch.cuda.mem_get_info`) and calls it, as vLLM sizes its pool by
`gpu_memory_utilization`.
"""

from __future__ import annotations

from muxserve.errors import InsufficientMemoryError

GIB = float(1 << 30)


def check_pool_fits(pool_bytes: int, pools: int, available: int, where: str) -> None:
    """A configured pool (`pools` of `pool_bytes`, one per rank) must fit in what `where` has
    `available` now; InsufficientMemoryError with both numbers, before anything is allocated
    (a 1e15-byte pool must fail here, not in the allocator or a deque of block ids)."""
    need = pool_bytes * pools
    if need > available:
        raise InsufficientMemoryError(
            f"kv_pool_bytes {pool_bytes} ({pool_bytes / GIB:.2f} GiB) x {pools} pool(s) = "
            f"{need / GIB:.2f} GiB does not fit in the {available / GIB:.2f} GiB ({available} "
            f"bytes) {where} has available; lower kv_pool_bytes"
        )


def host_available_bytes() -> int:
    """Memory the host can give now without swapping (MemAvailable), else its free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def pool_bytes_from_memory(
    total: int, used: int, utilization: float, block_bytes: int, device: str = "the device"
) -> int:
    """`utilization` of the device's `total` bytes, less the `used` bytes (weights, contexts,
    anything in use now), rounded down to whole blocks.

    Raises InsufficientMemoryError, with the numbers, when that leaves no block: the models
    do not fit beside a KV pool.
    """
    budget = int(total * utilization)
    left = budget - used
    pool = max(left, 0) // block_bytes * block_bytes
    if pool <= 0:
        raise InsufficientMemoryError(
            f"the models do not fit on {device}: {utilization:g} of its {total / GIB:.2f} GiB "
            f"is {budget / GIB:.2f} GiB ({budget} bytes), and {used / GIB:.2f} GiB ({used} "
            f"bytes) are in use after loading the weights, which leaves {left} bytes for the "
            f"KV pool, less than one block ({block_bytes} bytes); serve fewer or smaller "
            "models on this mesh, raise engine.gpu_memory_utilization, or set kv_pool_bytes"
        )
    return pool
