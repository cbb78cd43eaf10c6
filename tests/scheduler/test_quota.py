"""KV quotas: adaptive (ADBS) and static splits of the unified pool."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import pytest

from muxserve.kv.block_pool import BlockPool
from muxserve.kv.block_tables import BlockTables
from muxserve.scheduler.model_slot import ModelQueue, ModelSlot
from muxserve.scheduler.quota import AdaptiveQuota, StaticQuota, lent_quotas, quota_weights
from tests.helpers.scheduler import FakeRunner, make_layout, make_request, make_scheduler, make_slot

# kv bytes per token: a 2*1*1*8*2 = 32, b 2*2*2*8*2 = 128, c 2*1*1*16*4 = 128
SLOTS = [
    make_slot("a", rate=2.0, layout=make_layout()),
    make_slot("b", rate=1.0, layout=make_layout(num_layers=2, num_kv_heads=2)),
    make_slot("c", rate=3.0, layout=make_layout(head_dim=16, dtype_bytes=4)),
]


def queues(slots: list[ModelSlot]) -> dict[str, ModelQueue]:
    return {s.name: ModelQueue(s) for s in slots}


def test_weights_are_rate_times_kv_bytes_per_token() -> None:
    assert quota_weights(queues(SLOTS)) == {"a": 64.0, "b": 128.0, "c": 384.0}


def test_adaptive_initial_quotas() -> None:
    assert AdaptiveQuota().initial(100, queues(SLOTS)) == {"a": 11, "b": 22, "c": 67}
    s = make_scheduler(SLOTS, 100)
    assert s.pool.snapshot() == {"a": (0, 11), "b": (0, 22), "c": (0, 67)}


def test_static_initial_quotas_are_equal() -> None:
    assert StaticQuota().initial(100, queues(SLOTS)) == {"a": 34, "b": 33, "c": 33}
    s = make_scheduler(SLOTS, 99, kv_mode="static")
    assert s.pool.snapshot() == {"a": (0, 33), "b": (0, 33), "c": (0, 33)}


def with_shares(*shares: float | None) -> list[ModelSlot]:
    """SLOTS with the plan's kv_share set per model (None: no share)."""
    return [replace(s, kv_share=k) for s, k in zip(SLOTS, shares, strict=True)]


def test_plan_shares_set_the_initial_quotas() -> None:
    slots = with_shares(0.5, 0.3, 0.2)
    assert AdaptiveQuota().initial(100, queues(slots)) == {"a": 50, "b": 30, "c": 20}
    assert StaticQuota().initial(100, queues(slots)) == {"a": 50, "b": 30, "c": 20}
    # 49.5, 24.75, 24.75: largest remainders first, ties in model order
    slots = with_shares(0.5, 0.25, 0.25)
    assert AdaptiveQuota().initial(99, queues(slots)) == {"a": 49, "b": 25, "c": 25}
    s = make_scheduler(slots, 99)
    assert s.pool.snapshot() == {"a": (0, 49), "b": (0, 25), "c": (0, 25)}


def test_shares_rounded_down_by_the_plan_still_hand_out_the_whole_pool() -> None:
    # 0.9999 in all: 49.995, 25.0025, 25.0025 blocks once normalised
    slots = with_shares(0.4999, 0.25, 0.25)
    assert AdaptiveQuota().initial(100, queues(slots)) == {"a": 50, "b": 25, "c": 25}
    # shares that sum to 1 in decimal but not in binary are accepted
    assert AdaptiveQuota().initial(100, queues(with_shares(0.1, 0.2, 0.7))) == {
        "a": 10,
        "b": 20,
        "c": 70,
    }


def test_models_without_a_share_split_what_is_left() -> None:
    slots = with_shares(0.5, None, None)
    # adaptive: b and c split 50 blocks by weight 128 : 384 -> 12.5, 37.5; the tie goes to b
    assert AdaptiveQuota().initial(100, queues(slots)) == {"a": 50, "b": 13, "c": 37}
    # static: equally
    assert StaticQuota().initial(100, queues(slots)) == {"a": 50, "b": 25, "c": 25}
    s = make_scheduler(slots, 100, kv_mode="static")
    assert s.pool.snapshot() == {"a": (0, 50), "b": (0, 25), "c": (0, 25)}


def test_shares_over_the_whole_pool_are_refused() -> None:
    with pytest.raises(ValueError, match=r"kv_share sum to 1.2 > 1 \(a 0.6, b 0.6\)"):
        AdaptiveQuota().initial(100, queues(with_shares(0.6, 0.6, None)))


def test_ceilings() -> None:
    pool = BlockPool(100, {"a": 11, "b": 22, "c": 67})
    assert AdaptiveQuota().ceiling(pool, "a") == 100
    assert StaticQuota().ceiling(pool, "a") == 11
    assert (AdaptiveQuota.adaptive, StaticQuota.adaptive) == (True, False)


def rebalanced(
    pool: BlockPool, qs: Mapping[str, ModelQueue], slots: list[ModelSlot]
) -> dict[str, tuple[int, int]]:
    tables = BlockTables(pool, {s.name: s.layout for s in slots})
    AdaptiveQuota().rebalance(pool, tables, qs)
    pool.check_integrity()
    assert sum(q for _, q in pool.snapshot().values()) == pool.num_blocks
    return pool.snapshot()


def test_rebalance_gives_free_blocks_to_demand_first() -> None:
    slots = [make_slot("a"), make_slot("b")]
    qs = queues(slots)
    for i in range(3):  # 15 tokens + the next one: 4 blocks each
        qs["a"].waiting.append(make_request(f"a{i}", "a", prompt=15, arrival=float(i)))
    pool = BlockPool(20, {"a": 10, "b": 10})
    # a's demand (12) first, then the other 8 blocks by weight.
    assert rebalanced(pool, qs, slots) == {"a": (0, 16), "b": (0, 4)}


def test_rebalance_without_demand_splits_by_weight() -> None:
    slots = [make_slot("a", rate=3.0), make_slot("b")]
    pool = BlockPool(20, {"a": 2, "b": 18})
    assert rebalanced(pool, queues(slots), slots) == {"a": (0, 15), "b": (0, 5)}


def test_rebalance_never_takes_what_a_model_holds() -> None:
    slots = [make_slot("a"), make_slot("b")]
    qs = queues(slots)
    pool = BlockPool(20, {"a": 10, "b": 10})
    pool.allocate("b", 9)  # held by b's running requests (tables are not needed here)
    for i in range(5):
        qs["a"].waiting.append(make_request(f"a{i}", "a", prompt=15, arrival=float(i)))
    # a wants 20 but only 11 are free: it gets all of them; b keeps its 9.
    assert rebalanced(pool, qs, slots) == {"a": (0, 11), "b": (9, 9)}


def test_rebalance_demand_of_running_requests_next_token() -> None:
    slots = [make_slot("a"), make_slot("b")]
    pool = BlockPool(10, {"a": 5, "b": 5})
    tables = BlockTables(pool, {s.name: s.layout for s in slots})
    qs = queues(slots)
    req = make_request("a0", "a", prompt=7)
    req.output_token_ids.append(5)
    req.num_computed_tokens = 7
    qs["a"].running.append(req)
    tables.cover("a", "a0", 8)  # 2 blocks; the 9th token needs a third
    AdaptiveQuota().rebalance(pool, tables, qs)
    # a: holds 2, demand 1, then 7 spare split 4/3 (ties go to the first model)
    assert pool.snapshot() == {"a": (2, 7), "b": (0, 3)}


def test_adaptive_quota_follows_load_and_keeps_the_idle_models_usage() -> None:
    s = make_scheduler([make_slot("a"), make_slot("b")], 40, rebalance_interval=2)
    assert s.pool.snapshot() == {"a": (0, 20), "b": (0, 20)}
    s.add_request(make_request("b0", "b", prompt=8, max_tokens=40, arrival=0.0))
    for i in range(10):  # 12-token prompts: 3 blocks each, 4 with the first output token
        s.add_request(make_request(f"a{i}", "a", prompt=12, max_tokens=8, arrival=1.0 + i))
    runner = FakeRunner(s)
    # a's prefill admits 5 requests: the k-th needs 3 blocks plus a reserve of one block per
    # request already running (3+4 <= 20-12, but 3+5 > 20-15); b's waits for the SMs
    runner.step()
    assert s.pool.snapshot() == {"a": (15, 20), "b": (0, 20)}
    runner.step()
    # First rebalance: b0 (oldest waiting) gets its 3 blocks, a's demand (5 waiting x 4 + 5
    # running x 1) takes the other 22 free blocks; b keeps nothing it does not need.
    assert s.pool.snapshot() == {"a": (15, 37), "b": (2, 3)}
    peak_a = 0
    while s.has_work():
        runner.step()
        snap = s.pool.snapshot()
        peak_a = max(peak_a, snap["a"][1])
        assert snap["b"][1] >= snap["b"][0]  # b's quota never drops below what b holds
    # once b is done, a short of quota rebalances in place and borrows the whole pool rather
    # than preempting its own requests
    assert peak_a == 40
    assert s.pool.num_free == 40
    assert {r.finish_reason.value for r in runner.finished.values()} == {"length"}  # type: ignore[union-attr]


def test_static_quotas_stay_fixed_under_load() -> None:
    s = make_scheduler([make_slot("a"), make_slot("b")], 40, kv_mode="static", rebalance_interval=1)
    for i in range(10):
        s.add_request(make_request(f"a{i}", "a", prompt=12, max_tokens=8, arrival=float(i)))
    runner = FakeRunner(s)
    while s.has_work():
        runner.step()
        assert s.pool.quota("a") == 20
        assert s.pool.quota("b") == 20
        assert s.pool.used("a") <= 20
    assert s.num_preemptions > 0  # a alone would have wanted more than its half


def test_lent_quotas_take_blocks_still_lent_from_the_owed_models_first() -> None:
    shares = {"a": 10, "b": 10, "c": 10}
    # all awake: a holds 8 beyond its share; b (quota 8 < 10) is owed, c (quota 10) is not
    used = {"a": 18, "b": 8, "c": 0}
    now = {"a": 18, "b": 8, "c": 10}
    assert lent_quotas(shares, used, now, ["a", "b", "c"], 30) == {"a": 18, "b": 8, "c": 4}
    # b asleep: its 10 lent 5/5; a keeps 18, c the rest
    used = {"a": 18, "b": 0, "c": 0}
    assert lent_quotas(shares, used, now, ["a", "c"], 30) == {"a": 18, "c": 12}
    assert lent_quotas(shares, used, now, [], 30) == {}
