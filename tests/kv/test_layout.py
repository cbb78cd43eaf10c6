"""KVLayout: how one model views a physical block of the shared pool."""

from __future__ import annotations

import dataclasses

import pytest

from muxserve.kv.layout import KVLayout

KIB16 = 16 << 10


@pytest.mark.parametrize(
    ("head_dim", "dtype_bytes", "block_bytes", "tokens"),
    [
        (128, 2, KIB16, 32),  # Llama fp16, the paper's only case
        (128, 4, KIB16, 16),  # fp32
        (64, 2, KIB16, 64),  # bf16, small heads
        (256, 2, KIB16, 16),  # Gemma-style large heads
        (80, 2, KIB16, 51),  # 16384 / 320 = 51.2: the remainder of the block is unused
        (8, 2, 128, 4),
        (16, 4, 128, 1),  # exactly one token
    ],
)
def test_tokens_per_block(head_dim: int, dtype_bytes: int, block_bytes: int, tokens: int) -> None:
    layout = KVLayout(32, 8, head_dim, dtype_bytes, block_bytes)
    assert layout.tokens_per_block == tokens


def test_blocks_per_logical_and_bytes_per_token() -> None:
    layout = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype_bytes=2, block_bytes=KIB16)
    assert layout.blocks_per_logical == 256
    assert layout.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072


@pytest.mark.parametrize(
    ("num_tokens", "logical", "physical"),
    [(0, 0, 0), (1, 1, 6), (4, 1, 6), (5, 2, 12), (8, 2, 12), (9, 3, 18), (400, 100, 600)],
)
def test_blocks_for_tokens(num_tokens: int, logical: int, physical: int) -> None:
    layout = KVLayout(num_layers=2, num_kv_heads=3, head_dim=8, dtype_bytes=2, block_bytes=128)
    assert layout.tokens_per_block == 4
    assert layout.logical_blocks_for(num_tokens) == logical
    assert layout.physical_blocks_for(num_tokens) == physical


@pytest.mark.parametrize(
    ("head_dim", "dtype_bytes", "block_bytes"),
    [(128, 2, 511), (128, 4, 1023), (8, 2, 31), (8, 2, 0)],
)
def test_block_too_small_raises(head_dim: int, dtype_bytes: int, block_bytes: int) -> None:
    with pytest.raises(ValueError, match="cannot hold one token"):
        KVLayout(1, 1, head_dim, dtype_bytes, block_bytes)


def test_smallest_block_that_fits_one_token() -> None:
    assert KVLayout(1, 1, 128, 2, 512).tokens_per_block == 1


def test_layout_is_frozen() -> None:
    layout = KVLayout(1, 1, 8, 2, 128)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.head_dim = 16  # type: ignore[misc]
