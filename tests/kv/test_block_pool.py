"""BlockPool: block ids, FIFO free list, per-model quotas and the pool's invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from muxserve.kv.block_pool import BlockPool, proportional_split


def ids(a: np.ndarray) -> list[int]:
    return [int(x) for x in a]


def test_new_pool() -> None:
    pool = BlockPool(8, {"a": 5, "b": 3})
    assert pool.models == ["a", "b"]
    assert pool.num_free == 8
    assert pool.snapshot() == {"a": (0, 5), "b": (0, 3)}
    assert (pool.headroom("a"), pool.headroom("b")) == (5, 3)
    pool.check_integrity()


@pytest.mark.parametrize("num_blocks", [0, -3])
def test_pool_needs_a_block(num_blocks: int) -> None:
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(num_blocks, {"a": 0})


def test_quotas_above_pool_rejected() -> None:
    with pytest.raises(ValueError, match="exceed the pool's 8 blocks"):
        BlockPool(8, {"a": 5, "b": 4})


def test_ids_come_from_a_fifo_free_list() -> None:
    pool = BlockPool(8, {"a": 4, "b": 4})
    a1 = pool.allocate("a", 3)
    assert a1.dtype == np.int32
    assert ids(a1) == [0, 1, 2]
    assert ids(pool.allocate("b", 2)) == [3, 4]
    pool.free("a", np.array([1, 0]))  # freed ids go to the back, in the order given
    assert pool.num_free == 5
    assert ids(pool.allocate("b", 2)) == [5, 6]
    assert ids(pool.allocate("a", 3)) == [7, 1, 0]
    assert pool.snapshot() == {"a": (4, 4), "b": (4, 4)}
    assert pool.num_free == 0
    pool.check_integrity()


def test_allocate_zero() -> None:
    pool = BlockPool(2, {"a": 1})
    assert ids(pool.allocate("a", 0)) == []
    assert pool.used("a") == 0


def test_quota_enforced() -> None:
    pool = BlockPool(10, {"a": 3, "b": 7})
    pool.allocate("a", 2)
    assert pool.headroom("a") == 1
    assert pool.can_allocate("a", 1)
    assert not pool.can_allocate("a", 2)
    with pytest.raises(RuntimeError, match=r"a: cannot allocate 2 blocks \(used 2, quota 3"):
        pool.allocate("a", 2)
    assert pool.snapshot() == {"a": (2, 3), "b": (0, 7)}  # a failed allocate takes nothing
    assert pool.num_free == 8
    pool.check_integrity()


def test_headroom_is_quota_minus_usage_and_shrinks_with_use() -> None:
    pool = BlockPool(10, {"a": 4, "b": 6})
    pool.allocate("b", 6)
    assert (pool.headroom("a"), pool.headroom("b")) == (4, 0)
    assert pool.can_allocate("b", 0)
    assert not pool.can_allocate("b", 1)


def test_free_then_reallocate_returns_to_quota() -> None:
    pool = BlockPool(4, {"a": 4})
    blocks = pool.allocate("a", 4)
    assert not pool.can_allocate("a", 1)
    pool.free("a", blocks)
    assert pool.used("a") == 0
    assert ids(pool.allocate("a", 4)) == [0, 1, 2, 3]


def test_free_empty_is_noop() -> None:
    pool = BlockPool(4, {"a": 4})
    pool.free("a", np.array([], dtype=np.int32))
    assert pool.num_free == 4


@pytest.mark.parametrize(
    ("model", "bad"),
    [
        ("b", [0]),  # a's block
        ("a", [5]),  # a free block
        ("a", [0, 0]),  # the same block twice
        ("a", [1, 5]),  # one owned, one free: nothing is freed
    ],
)
def test_freeing_blocks_not_owned_raises(model: str, bad: list[int]) -> None:
    pool = BlockPool(8, {"a": 4, "b": 4})
    pool.allocate("a", 3)  # 0, 1, 2
    pool.allocate("b", 2)  # 3, 4
    with pytest.raises(RuntimeError, match="does not own"):
        pool.free(model, np.array(bad))
    assert pool.snapshot() == {"a": (3, 4), "b": (2, 4)}
    assert pool.num_free == 3
    pool.check_integrity()
    assert ids(pool.allocate("b", 2)) == [5, 6]  # the free list is untouched


def test_set_quotas() -> None:
    pool = BlockPool(10, {"a": 5, "b": 5})
    pool.allocate("a", 4)
    pool.set_quotas({"a": 4, "b": 6})
    assert pool.snapshot() == {"a": (4, 4), "b": (0, 6)}
    pool.set_quotas({"a": 9, "b": 0})
    assert pool.headroom("a") == 5
    pool.check_integrity()


def test_set_quotas_below_usage_rejected() -> None:
    pool = BlockPool(10, {"a": 5, "b": 5})
    pool.allocate("a", 4)
    with pytest.raises(ValueError, match=r"quota below usage for \['a'\]"):
        pool.set_quotas({"a": 3, "b": 7})
    assert pool.snapshot() == {"a": (4, 5), "b": (0, 5)}


def test_set_quotas_over_pool_rejected() -> None:
    pool = BlockPool(10, {"a": 5, "b": 5})
    with pytest.raises(ValueError, match="exceed the pool's 10 blocks"):
        pool.set_quotas({"a": 6, "b": 5})
    assert pool.snapshot() == {"a": (0, 5), "b": (0, 5)}


@pytest.mark.parametrize("quotas", [{"a": 5}, {"a": 5, "b": 1, "c": 1}, {"a": 5, "c": 1}])
def test_set_quotas_must_name_every_model(quotas: dict[str, int]) -> None:
    pool = BlockPool(10, {"a": 5, "b": 5})
    with pytest.raises(ValueError, match="must name exactly"):
        pool.set_quotas(quotas)


# ---- check_integrity catches tampering with the private state -------------------------------


def _busy_pool() -> BlockPool:
    pool = BlockPool(8, {"a": 4, "b": 4})
    pool.allocate("a", 3)  # 0, 1, 2
    pool.allocate("b", 1)  # 3
    pool.check_integrity()
    return pool


def _append_free(pool: BlockPool, block: int) -> None:
    """Corrupt the free list: `block` goes to its tail, owned or not."""
    pool._ring[(pool._head + pool._num_free) % pool.num_blocks] = block
    pool._num_free += 1


def test_integrity_free_listed_twice() -> None:
    pool = _busy_pool()
    _append_free(pool, int(pool._ring[pool._head]))
    with pytest.raises(AssertionError, match="free list twice"):
        pool.check_integrity()


def test_integrity_free_listed_block_with_owner() -> None:
    pool = _busy_pool()
    _append_free(pool, 0)  # a's block 0 is also on the free list
    with pytest.raises(AssertionError, match="free-listed block has an owner"):
        pool.check_integrity()


def test_integrity_lost_block() -> None:
    pool = _busy_pool()
    pool._num_free -= 1  # a block leaks: neither free nor owned
    with pytest.raises(AssertionError, match=r"free \+ used != total"):
        pool.check_integrity()


def test_integrity_usage_out_of_sync() -> None:
    pool = _busy_pool()
    pool._used["b"] += 1
    with pytest.raises(AssertionError, match="b: usage 2 != owned 1"):
        pool.check_integrity()


def test_integrity_owner_changed() -> None:
    pool = _busy_pool()
    pool._owner[3] = 0  # b's block now claims to be a's
    with pytest.raises(AssertionError, match="a: usage 3 != owned 4"):
        pool.check_integrity()


def test_integrity_usage_above_quota() -> None:
    pool = _busy_pool()
    pool._quota["a"] = 2
    with pytest.raises(AssertionError, match="a: usage above quota"):
        pool.check_integrity()


def test_integrity_quotas_above_pool() -> None:
    pool = _busy_pool()
    pool._quota["b"] = 5
    with pytest.raises(AssertionError, match="quotas exceed the pool"):
        pool.check_integrity()


# ---- proportional_split ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "weights", "parts"),
    [
        (10, {"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 4, "b": 3, "c": 3}),  # ties: first named
        (7, {"a": 3.0, "b": 1.0}, {"a": 5, "b": 2}),  # 5.25, 1.75: b has the larger remainder
        (100, {"a": 64.0, "b": 128.0, "c": 384.0}, {"a": 11, "b": 22, "c": 67}),
        (5, {"a": 0.0, "b": 0.0}, {"a": 3, "b": 2}),  # no weight at all: an even split
        (5, {"a": -1.0, "b": 1.0}, {"a": 0, "b": 5}),  # negative weights count as zero
        (0, {"a": 1.0, "b": 2.0}, {"a": 0, "b": 0}),
        (3, {"a": 1.0}, {"a": 3}),
    ],
)
def test_proportional_split_exact(
    total: int, weights: dict[str, float], parts: dict[str, int]
) -> None:
    assert proportional_split(total, weights) == parts


weights_st = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=3),
    st.floats(min_value=0.0, max_value=1e6, allow_nan=False),
    min_size=1,
    max_size=8,
)


@given(total=st.integers(0, 100_000), weights=weights_st)
def test_proportional_split_sums_and_follows_weights(total: int, weights: dict[str, float]) -> None:
    parts = proportional_split(total, weights)
    assert list(parts) == list(weights)
    assert sum(parts.values()) == total
    assert all(p >= 0 for p in parts.values())
    wsum = sum(weights.values())
    if wsum <= 0:
        exact = {n: total / len(weights) for n in weights}
    else:
        exact = {n: w / wsum * total for n, w in weights.items()}
    for n in weights:  # largest remainder: each part is its exact share rounded down or up
        assert abs(parts[n] - exact[n]) < 1 + 1e-9
    for m in weights:  # a strictly larger exact share never gets fewer units
        for n in weights:
            if exact[m] > exact[n] + 1e-6:
                assert parts[m] >= parts[n]


def test_the_free_list_wraps_around_its_ring_in_fifo_order() -> None:
    pool = BlockPool(5, {"a": 5})
    first = pool.allocate("a", 4)
    pool.free("a", np.array([2, 0]))  # tail: 4, 2, 0 (the ring's slots 4, 0, 1)
    assert ids(pool.allocate("a", 3)) == [4, 2, 0]
    pool.free("a", np.array([3, 4, 1]))
    assert ids(pool.allocate("a", 2)) == [3, 4]
    assert pool.num_free == 1
    pool.free("a", first[[2]])  # 2
    assert ids(pool.allocate("a", 2)) == [1, 2]
    assert pool.num_free == 0
    pool.check_integrity()


def test_a_logical_block_is_one_array_operation() -> None:
    """1,024 ids (Llama-7B: 32 layers x 32 KV heads) come back as one int32 array, in order."""
    pool = BlockPool(4096, {"a": 4096})
    pool.allocate("a", 100)
    got = pool.allocate("a", 1024)
    assert got.dtype == np.int32 and ids(got) == list(range(100, 1124))
    pool.check_integrity()


def test_models_join_and_leave_the_pool() -> None:
    pool = BlockPool(8, {"a": 4, "b": 4})
    a = pool.allocate("a", 2)
    pool.add_model("c")
    assert pool.models == ["a", "b", "c"] and pool.snapshot()["c"] == (0, 0)
    with pytest.raises(ValueError, match="c is in the pool already"):
        pool.add_model("c")
    pool.set_quotas({"a": 4, "b": 0, "c": 4})
    c = pool.allocate("c", 3)
    with pytest.raises(ValueError, match="a holds 2 blocks; it cannot leave the pool"):
        pool.remove_model("a")
    pool.remove_model("b")
    assert pool.models == ["a", "c"]
    pool.check_integrity()  # owner codes stay: c's blocks are still c's
    pool.free("a", a)
    pool.remove_model("a")
    pool.add_model("a")  # back, with a new owner code
    pool.check_integrity()
    pool.free("c", c)
    assert pool.snapshot() == {"c": (0, 4), "a": (0, 0)} and pool.num_free == 8
