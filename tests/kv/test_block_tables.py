"""BlockTables: per-request tables of physical block ids over the shared pool."""

from __future__ import annotations

import numpy as np
import pytest

from muxserve.kv.block_pool import BlockPool
from muxserve.kv.block_tables import BlockTables
from muxserve.kv.layout import KVLayout

# "a": 4 tokens per block, 2 layers x 3 KV heads = 6 physical blocks per logical block.
# "b": 2 tokens per block (head_dim 16), 1 physical block per logical block.
LAYOUTS = {
    "a": KVLayout(num_layers=2, num_kv_heads=3, head_dim=8, dtype_bytes=2, block_bytes=128),
    "b": KVLayout(num_layers=1, num_kv_heads=1, head_dim=16, dtype_bytes=2, block_bytes=128),
}


@pytest.fixture
def tables() -> BlockTables:
    return BlockTables(BlockPool(24, {"a": 20, "b": 4}), LAYOUTS)


def test_blocks_to_cover(tables: BlockTables) -> None:
    assert tables.blocks_to_cover("a", "r", 0) == 0
    assert tables.blocks_to_cover("a", "r", 1) == 6
    assert tables.blocks_to_cover("a", "r", 5) == 12
    assert tables.blocks_to_cover("b", "s", 5) == 3
    assert tables.can_cover("a", "r", 12)  # 18 blocks <= quota 20
    assert not tables.can_cover("a", "r", 13)  # 24 blocks > quota 20
    assert tables.num_logical("r") == 0


def test_cover_shape_and_ids(tables: BlockTables) -> None:
    tables.cover("a", "r", 5)
    t = tables.table("r")
    assert t.shape == (2, 2, 3)  # (num_logical, layers, kv_heads)
    assert t.dtype == np.int32
    np.testing.assert_array_equal(t, np.arange(12).reshape(2, 2, 3))
    assert tables.num_logical("r") == 2
    assert tables.pool.used("a") == 12
    assert tables.holders() == 1
    tables.cover("b", "s", 3)
    np.testing.assert_array_equal(tables.table("s"), [[[12]], [[13]]])
    tables.pool.check_integrity()


def test_cover_within_the_last_block_keeps_the_table(tables: BlockTables) -> None:
    tables.cover("a", "r", 5)
    t = tables.table("r")
    tables.cover("a", "r", 8)
    assert tables.table("r") is t
    assert tables.blocks_to_cover("a", "r", 8) == 0
    assert tables.pool.used("a") == 12


def test_growth_appends_into_a_new_array(tables: BlockTables) -> None:
    tables.cover("a", "r", 4)
    tables.cover("b", "s", 2)  # takes block 6, so r's next blocks are not contiguous
    old = tables.table("r")
    snapshot = old.copy()
    tables.cover("a", "r", 9)
    new = tables.table("r")
    assert new is not old
    np.testing.assert_array_equal(old, snapshot)  # a job in flight keeps a stable table
    assert new.shape == (3, 2, 3)
    np.testing.assert_array_equal(new[:1], snapshot)
    np.testing.assert_array_equal(new[1:].ravel(), np.arange(7, 19))
    assert tables.pool.used("a") == 18


def test_cover_zero_tokens_registers_an_empty_table(tables: BlockTables) -> None:
    tables.cover("a", "r", 0)
    assert tables.table("r").shape == (0, 2, 3)
    assert tables.holders() == 1
    assert tables.release("r") == 0
    assert tables.holders() == 0


def test_release_frees_everything(tables: BlockTables) -> None:
    tables.cover("a", "r", 9)
    tables.cover("b", "s", 3)
    assert tables.release("r") == 18
    assert tables.pool.snapshot() == {"a": (0, 20), "b": (2, 4)}
    assert tables.holders() == 1
    assert tables.num_logical("r") == 0
    with pytest.raises(KeyError):
        tables.table("r")
    assert tables.release("s") == 2
    assert tables.pool.num_free == 24
    tables.pool.check_integrity()


def test_release_unknown_or_twice_is_zero(tables: BlockTables) -> None:
    assert tables.release("nobody") == 0
    tables.cover("b", "s", 1)
    assert tables.release("s") == 1
    assert tables.release("s") == 0
    assert tables.pool.num_free == 24


def test_released_ids_are_reused_after_the_rest(tables: BlockTables) -> None:
    tables.cover("b", "s", 4)  # 0, 1
    tables.release("s")
    tables.cover("b", "t", 2)
    np.testing.assert_array_equal(tables.table("t").ravel(), [2])


def test_views_follow_cover_and_release(tables: BlockTables) -> None:
    # the scheduler's loops read these instead of calling `table` and `capacity` per request
    assert dict(tables.by_request) == {} and dict(tables.capacities) == {}
    tables.cover("a", "r", 5)
    tables.cover("b", "s", 3)
    assert dict(tables.capacities) == {"r": 8, "s": 4}  # 2 x 4 and 2 x 2 tokens
    assert tables.by_request["r"] is tables.table("r")
    tables.cover("a", "r", 9)
    assert tables.capacities["r"] == 12 == tables.capacity("r")
    assert tables.by_request["r"] is tables.table("r")  # the grown table, not the old one
    tables.release("r")
    assert set(tables.by_request) == {"s"} and dict(tables.capacities) == {"s": 4}
    assert tables.capacity("r") == 0
