"""A sleeping model in the scheduler: no quota (ADBS), no jobs, its requests wait; waking it
gives it blocks again. Torch-free, exact block counts."""

from __future__ import annotations

import pytest

from muxserve.config import EngineConfig
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


def test_a_static_partition_keeps_a_sleeping_models_share():
    s = scheduler(asleep=("c",), kv_mode="static")
    assert quotas(s) == {"a": 10, "b": 10, "c": 10}
    s.sleep_model("a")
    assert quotas(s) == {"a": 10, "b": 10, "c": 10}
    s.check_integrity()
