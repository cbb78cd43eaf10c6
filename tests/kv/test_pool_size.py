"""The KV pool's size from a device's memory: exact bytes, and the error when nothing is left."""

from __future__ import annotations

import pytest

from muxserve.errors import InsufficientMemoryError
from muxserve.kv.pool_size import pool_bytes_from_memory

GIB = 1 << 30


def test_what_the_utilization_leaves_after_the_weights_in_whole_blocks() -> None:
    # 0.9 x 80 GiB = 77309411328 bytes; less 20 GiB in use: 55834574848, 3407872 blocks
    assert pool_bytes_from_memory(80 * GIB, 20 * GIB, 0.9, 16 << 10) == 55_834_574_848
    # 0.5 x 1000 - 123 = 377 bytes: three 100-byte blocks
    assert pool_bytes_from_memory(1000, 123, 0.5, 100) == 300
    assert pool_bytes_from_memory(1000, 0, 1.0, 1000) == 1000


@pytest.mark.parametrize(("used", "left"), [(900, 0), (950, -50), (850, 50)])
def test_no_room_for_a_block_names_the_numbers(used: int, left: int) -> None:
    with pytest.raises(InsufficientMemoryError) as info:
        pool_bytes_from_memory(1000, used, 0.9, 100, "cuda:1")
    msg = str(info.value)
    assert msg.startswith("the models do not fit on cuda:1: 0.9 of its")
    assert f"is 0.00 GiB (900 bytes), and 0.00 GiB ({used} bytes) are in use" in msg
    assert f"leaves {left} bytes for the KV pool, less than one block (100 bytes)" in msg


def test_a_configured_pool_must_fit_what_is_available() -> None:
    from muxserve.kv.pool_size import check_pool_fits

    check_pool_fits(1 << 30, 2, 2 << 30, "this host")  # exactly fits
    with pytest.raises(InsufficientMemoryError) as info:
        check_pool_fits(10**15, 2, 24 << 30, "this host")
    assert str(info.value) == (
        "kv_pool_bytes 1000000000000000 (931322.57 GiB) x 2 pool(s) = 1862645.15 GiB does not "
        "fit in the 24.00 GiB (25769803776 bytes) this host has available; lower kv_pool_bytes"
    )


def test_an_engine_with_an_absurd_pool_fails_before_allocating_it(demo_models) -> None:
    from muxserve.config import parse_config
    from muxserve.engine import MuxEngine

    config = parse_config(
        {
            "models": [{"name": "m", "path": str(demo_models["mistral-demo"])}],
            "engine": {"kv_pool_bytes": 10**15, "device": "cpu"},
        }
    )
    # refused before the 10^15-byte buffer or a free list of 2.4e11 block ids is built
    with pytest.raises(InsufficientMemoryError, match=r"kv_pool_bytes 1000000000000000 .* x 1"):
        MuxEngine(config)
