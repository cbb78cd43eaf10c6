"""A sleeping model in the scheduler: no quota, no jobs, its requests wait; waking it
gives it blocks again. Torch-free, exact block counts."""

from __future__ import annotations

import pytest

from muxserve.config import EngineConfig
from muxserve.errors import PromptTooLongError
from muxserve.scheduler.job import Phase
from muxserve.scheduler.scheduler import Scheduler
from tests.helpers.scheduler import FakeRunner, make_request, make_slot


def scheduler(asleep: tuple[str, ...] = (), kv_mode: str = "unified") -> Scheduler:
    slots = [make_slot(m) for m in "abc"]
    return Scheduler.create(slots, 30, EngineConfig(kv_mode=kv_mode), asleep=asleep)  # type: ignore[arg-type]


def quotas(s: Scheduler) -> dict[str, int]:
    return {m: st.blocks_quota for m, st in s.stats().items()}


def test_a_model_that_starts_asleep_has_no_quota_and_no_jobs():
    s = scheduler(asleep=("c",))
    assert quotas(s) == {"a": 15, "b": 15, "c": 0}
    s.add_request(make_request("c0", "c", max_tokens=2))
    assert not s.has_runnable_work() and s.has_work()
    assert s.schedule() == []
    assert s.stats()["c"].waiting == 1
    s.check_integrity()


def test_sleep_gives_the_quota_to_the_others_at_once():
    s = scheduler()
    assert quotas(s) == {"a": 10, "b": 10, "c": 10}
    s.sleep_model("a")
    assert quotas(s) == {"a": 0, "b": 10, "c": 10}
    s.add_request(make_request("b0", "b", max_tokens=2))
    FakeRunner(s).step()  # the next schedule() rebalances over the awake models
    assert quotas(s)["a"] == 0
    assert quotas(s)["b"] + quotas(s)["c"] == 30
    s.check_integrity()


def test_wake_gives_blocks_back_and_the_waiting_request_runs():
    s = scheduler(asleep=("c",))
    s.add_request(make_request("c0", "c", max_tokens=3))
    s.wake_model("c")
    assert s.has_runnable_work()
    runner = FakeRunner(s)
    runner.drain()
    assert [j.model for j in runner.jobs] == ["c", "c", "c"]
    assert [j.phase for j in runner.jobs] == [Phase.PREFILL, Phase.DECODE, Phase.DECODE]
    assert runner.finished["c0"].output_token_ids and quotas(s)["c"] > 0
    s.check_integrity()


def test_a_model_with_requests_running_cannot_sleep():
    s = scheduler()
    s.add_request(make_request("a0", "a", max_tokens=4))
    FakeRunner(s).step()  # admitted: it holds blocks
    assert s.in_flight("a") == 1
    with pytest.raises(ValueError, match="a: 1 requests running"):
        s.sleep_model("a")
    assert "a" not in s.asleep
    s.check_integrity()


def used_and_quotas(s: Scheduler) -> dict[str, tuple[int, int]]:
    return {m: (st.blocks_used, st.blocks_quota) for m, st in s.stats().items()}


def test_a_static_partition_lends_a_sleeping_models_share_to_the_awake_ones():
    s = scheduler(asleep=("c",), kv_mode="static")
    assert quotas(s) == {"a": 15, "b": 15, "c": 0}
    s.sleep_model("a")
    assert quotas(s) == {"a": 0, "b": 30, "c": 0}
    s.wake_model("c")
    assert quotas(s) == {"a": 0, "b": 15, "c": 15}
    s.wake_model("a")
    assert quotas(s) == {"a": 10, "b": 10, "c": 10}
    s.check_integrity()


def test_a_static_partition_lends_in_proportion_to_the_plans_shares():
    slots = [
        make_slot("a", kv_share=0.5),
        make_slot("b", kv_share=0.3),
        make_slot("c", kv_share=0.2),
    ]
    s = Scheduler.create(slots, 30, EngineConfig(kv_mode="static"), asleep=("c",))
    # own shares 15/9/6; c's 6 split 15:9 = 3.75:2.25, largest remainder
    assert quotas(s) == {"a": 19, "b": 11, "c": 0}
    s.wake_model("c")
    assert quotas(s) == {"a": 15, "b": 9, "c": 6}
    s.check_integrity()


def test_a_woken_static_model_gets_its_share_back_as_the_borrower_frees_it():
    s = scheduler(asleep=("c",), kv_mode="static")
    for i in range(3):  # 16 tokens of prompt: 4 blocks each
        s.add_request(make_request(f"a{i}", "a", prompt=16, max_tokens=8, arrival=float(i)))
    runner = FakeRunner(s)
    runner.schedule()
    assert used_and_quotas(s) == {"a": (12, 15), "b": (0, 15), "c": (0, 0)}
    s.wake_model("c")
    # a keeps the 2 lent blocks it holds beyond its 10; c, owed its share, waits for them
    assert used_and_quotas(s) == {"a": (12, 12), "b": (0, 10), "c": (0, 8)}
    s.add_request(make_request("c0", "c", prompt=32, max_tokens=4, arrival=5.0))  # 9 blocks
    runner.drain()
    assert set(runner.finished) == {"a0", "a1", "a2", "c0"}
    assert len(runner.finished["c0"].output_token_ids) == 4
    assert used_and_quotas(s) == {"a": (0, 10), "b": (0, 10), "c": (0, 10)}
    s.check_integrity()


def test_a_sleeping_static_model_takes_requests_its_own_share_holds():
    s = scheduler(asleep=("c",), kv_mode="static")
    s.add_request(make_request("c0", "c", prompt=36, max_tokens=4))  # 40 tokens: its 10 blocks
    with pytest.raises(PromptTooLongError, match="its share of the pool holds 10 blocks"):
        s.add_request(make_request("c1", "c", prompt=37, max_tokens=4))
    s.wake_model("c")
    FakeRunner(s).drain()
    s.check_integrity()


def test_a_model_joins_asleep_and_an_asleep_idle_one_leaves():
    s = scheduler()
    s.add_model(make_slot("d"))
    assert quotas(s) == {"a": 10, "b": 10, "c": 10, "d": 0} and "d" in s.asleep
    with pytest.raises(ValueError, match="d is scheduled here already"):
        s.add_model(make_slot("d"))
    s.add_request(make_request("d0", "d", max_tokens=2))
    with pytest.raises(ValueError, match="only an asleep model with no requests"):
        s.remove_model("d")
    s.wake_model("d")
    FakeRunner(s).drain()
    s.sleep_model("d")
    s.remove_model("d")
    assert list(s.stats()) == ["a", "b", "c"]
    s.check_integrity()


def test_a_static_partition_splits_again_when_a_model_joins_or_leaves():
    s = scheduler(kv_mode="static")
    s.add_model(make_slot("d"))  # shares 8/8/7/7 (largest remainder); d's lent to a, b, c
    assert quotas(s) == {"a": 11, "b": 10, "c": 9, "d": 0}
    s.wake_model("d")
    assert quotas(s) == {"a": 8, "b": 8, "c": 7, "d": 7}
    s.sleep_model("d")
    s.remove_model("d")
    assert quotas(s) == {"a": 10, "b": 10, "c": 10}
    s.check_integrity()
