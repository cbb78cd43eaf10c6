"""KVPool: one byte buffer, viewed per model with its own dtype and head size."""

from __future__ import annotations

import pytest
import torch

from muxserve.config import EngineConfig
from muxserve.kv.layout import KVLayout
from muxserve.runner.kv_pool import KVPool, PoolSizing

CPU = torch.device("cpu")
BLOCK_BYTES = 512
NUM_BLOCKS = 4


def make_layout(head_dim: int, dtype: torch.dtype, block_bytes: int = BLOCK_BYTES) -> KVLayout:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return KVLayout(
        num_layers=2,
        num_kv_heads=2,
        head_dim=head_dim,
        dtype_bytes=itemsize,
        block_bytes=block_bytes,
    )


def block_bytes_of(pool: KVPool, i: int) -> torch.Tensor:
    """The raw bytes of physical block i."""
    return pool.buffer[i * pool.block_bytes : (i + 1) * pool.block_bytes]


@pytest.mark.parametrize(
    ("head_dim", "dtype", "shape"),
    [
        (16, torch.float32, (NUM_BLOCKS, 2, 4, 16)),  # 512 / (2 * 16 * 4)
        (32, torch.bfloat16, (NUM_BLOCKS, 2, 4, 32)),  # 512 / (2 * 32 * 2)
        (8, torch.float16, (NUM_BLOCKS, 2, 16, 8)),  # 512 / (2 * 8 * 2)
        (24, torch.float32, (NUM_BLOCKS, 2, 2, 24)),  # 512 // 192: 128 bytes of each block unused
    ],
)
def test_view_shape_dtype_and_strides(
    head_dim: int, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    pool = KVPool(NUM_BLOCKS, BLOCK_BYTES, CPU)
    view = pool.view(make_layout(head_dim, dtype), dtype)
    assert tuple(view.shape) == shape
    assert view.dtype == dtype
    itemsize = view.element_size()
    _, _, tpb, hd = shape
    assert view.stride() == (BLOCK_BYTES // itemsize, tpb * hd, hd, 1)
    assert view.data_ptr() == pool.buffer.data_ptr()
    assert torch.count_nonzero(view) == 0


def test_two_views_alias_the_same_block_bytes() -> None:
    pool = KVPool(NUM_BLOCKS, BLOCK_BYTES, CPU)
    a = pool.view(make_layout(16, torch.float32), torch.float32)  # (4, 2, 4, 16)
    b = pool.view(make_layout(32, torch.bfloat16), torch.bfloat16)  # (4, 2, 4, 32)
    c = pool.view(make_layout(8, torch.float16), torch.float16)  # (4, 2, 16, 8)
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(2, 4, 16, generator=gen)
    a[1] = values

    # block 1 of every view is exactly these 512 bytes; K first, then V
    raw = values.reshape(-1).view(torch.uint8)
    assert torch.equal(block_bytes_of(pool, 1), raw)
    assert torch.equal(b[1].reshape(-1).view(torch.uint8), raw)
    assert torch.equal(c[1].reshape(-1).view(torch.uint8), raw)
    assert torch.equal(
        b[1, 0].reshape(-1).view(torch.uint8), values[0].reshape(-1).view(torch.uint8)
    )
    assert torch.equal(
        b[1, 1].reshape(-1).view(torch.uint8), values[1].reshape(-1).view(torch.uint8)
    )
    for other in (0, 2, 3):  # neighbouring blocks untouched in every view
        assert torch.count_nonzero(block_bytes_of(pool, other)) == 0
        assert torch.count_nonzero(a[other]) == 0
        assert torch.count_nonzero(b[other]) == 0
        assert torch.count_nonzero(c[other]) == 0

    # and the other way round: a write through the bf16 view lands in block 2's bytes only
    b[2, 1, 3, 31] = 1.0  # the last element of the block
    assert torch.equal(block_bytes_of(pool, 1), raw)
    assert torch.nonzero(block_bytes_of(pool, 2)).flatten().tolist() == [510, 511]
    assert block_bytes_of(pool, 2)[-2:].tolist() == [0x80, 0x3F]  # bf16 1.0, little-endian
    assert torch.count_nonzero(block_bytes_of(pool, 3)) == 0


def test_views_with_unused_tail_bytes_keep_blocks_apart() -> None:
    pool = KVPool(NUM_BLOCKS, BLOCK_BYTES, CPU)
    small = pool.view(make_layout(24, torch.float32), torch.float32)  # uses 384 of 512 bytes
    small[0] = 1.0
    used = 2 * 2 * 24 * 4
    assert torch.equal(
        block_bytes_of(pool, 0)[:used], torch.ones(2, 2, 24).reshape(-1).view(torch.uint8)
    )
    assert torch.count_nonzero(block_bytes_of(pool, 0)[used:]) == 0
    assert torch.count_nonzero(pool.buffer[BLOCK_BYTES:]) == 0


def test_shared_cpu_pool_is_in_shared_memory() -> None:
    assert KVPool(2, 64, CPU, shared=True).buffer.is_shared()
    assert not KVPool(2, 64, CPU).buffer.is_shared()


@pytest.mark.parametrize(
    ("layout_dtype", "view_dtype"),
    [
        (torch.float16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32),
    ],
)
def test_view_with_a_dtype_other_than_the_layouts_raises(
    layout_dtype: torch.dtype, view_dtype: torch.dtype
) -> None:
    pool = KVPool(NUM_BLOCKS, BLOCK_BYTES, CPU)
    with pytest.raises(ValueError, match="dtype bytes"):
        pool.view(make_layout(16, layout_dtype), view_dtype)


def test_view_raises_when_block_bytes_are_not_whole_elements() -> None:
    pool = KVPool(NUM_BLOCKS, 518, CPU)  # 4 * 518 bytes is whole float32s, 518 is not
    with pytest.raises(ValueError):
        pool.view(make_layout(16, torch.float32, block_bytes=518), torch.float32)


@pytest.mark.parametrize("layout_block_bytes", [256, 1024])
def test_view_with_a_layout_for_another_block_size_raises(layout_block_bytes: int) -> None:
    pool = KVPool(NUM_BLOCKS, BLOCK_BYTES, CPU)
    with pytest.raises(ValueError):
        pool.view(make_layout(16, torch.float32, block_bytes=layout_block_bytes), torch.float32)


def test_the_pool_is_sized_by_the_config_or_the_cpu_default():
    assert PoolSizing(4096, 1 << 20).num_blocks([CPU]) == 256
    assert PoolSizing(4096, (1 << 20) + 4095).num_blocks([CPU, CPU]) == 256  # whole blocks
    assert PoolSizing(4096).num_blocks([CPU]) == 16384  # CPU_KV_POOL_BYTES: 64 MiB
    engine = EngineConfig(block_bytes=8192, kv_pool_bytes=1 << 20, gpu_memory_utilization=0.8)
    assert PoolSizing.of(engine) == PoolSizing(8192, 1 << 20, 0.8)
