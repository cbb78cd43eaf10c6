"""A model's service rate and what it bounds: the queue's expected wait, and Retry-After."""

from __future__ import annotations

import pytest

from muxserve.errors import QueueFullError
from muxserve.request import FinishReason
from muxserve.scheduler.scheduler import Scheduler
from muxserve.scheduler.service_rate import ServiceRate, retry_after_s
from tests.helpers.scheduler import make_request, make_scheduler, make_slot


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_rate_counts_only_time_with_work() -> None:
    r = ServiceRate(window=30.0, min_samples=4)
    assert r.rate(5.0) is None and r.expected_wait(3, 5.0) is None
    assert r.expected_wait(0, 5.0) == 0.0  # nothing ahead: no wait, rate or not
    r.on_busy(100.0)  # idle until now: the first 100 s do not count
    for t in (102.0, 104.0, 106.0):
        r.on_finished(t)
    assert r.rate(106.0) is None  # three completions are not yet a rate
    r.on_finished(108.0)
    assert r.rate(108.0) == 0.5  # 4 in the 8 s since the model got work
    assert r.expected_wait(10, 108.0) == 20.0
    r.on_idle(108.0)  # the last one left: the estimate is kept through the idle time
    r.on_busy(500.0)  # a new busy period: its rate replaces the last once it has one
    assert r.rate(501.0) == 0.5
    for t in (501.0, 501.5, 502.0, 502.5, 503.0):
        r.on_finished(t)
    assert r.rate(505.0) == 1.0  # 5 in 5 s


def test_old_completions_leave_the_window() -> None:
    r = ServiceRate(window=10.0, min_samples=4)
    r.on_busy(0.0)
    for t in range(1, 21):  # one a second for 20 s
        r.on_finished(float(t))
    assert r.rate(20.0) == 1.0  # 10 in the last 10 s
    assert r.rate(25.0) == 0.5  # 5 (16..20) in the last 10 s: the model slowed down


def test_a_stalled_model_is_rated_by_what_its_busy_time_allows() -> None:
    r = ServiceRate(window=30.0, min_samples=4)
    r.on_busy(0.0)
    assert r.rate(10.0) is None  # never rated, busy 10 s: too soon to say
    assert r.rate(40.0) == 4 / 30  # busy a whole window without 4 completions: below 4/30
    for t in (41.0, 42.0, 43.0, 44.0):
        r.on_finished(t)
    assert r.rate(44.0) == 4 / 30  # 4 in the 30 s window (14..44)
    r.on_finished(45.0)
    assert r.rate(45.0) == 5 / 30
    # the workers stall: no completion from 45 s on; the old estimate stands only while
    # the few completions left in the window still allow it
    assert r.rate(60.0) == 5 / 30  # 41..45 still in the window: 5 in 30 s
    assert r.rate(72.0) == 4 / 30  # 42..45: 3 completions, below min_samples, cap 4/30
    assert r.rate(120.0) == 4 / 30  # none left in the window: the cap over the window
    r.on_idle(120.0)
    r.on_busy(200.0)  # a new busy period: the last estimate stands, capped by its span
    assert r.rate(201.0) == 4 / 30
    assert r.expected_wait(8, 201.0) == 60.0


@pytest.mark.parametrize(
    ("wait", "seconds"), [(None, 1), (0.0, 1), (0.2, 1), (1.0, 1), (12.1, 13), (1e9, 3600)]
)
def test_retry_after_is_the_wait_rounded_up_at_least_one_second(wait, seconds) -> None:
    assert retry_after_s(wait) == seconds


def finish(s: Scheduler, ids: list[str], clock: Clock, times: list[float]) -> None:
    for rid, t in zip(ids, times, strict=True):
        clock.now = t
        s.finish(rid, FinishReason.STOP)


def test_a_queue_longer_than_max_queue_wait_is_refused_with_its_wait() -> None:
    clock = Clock()
    s = make_scheduler([make_slot("a", max_queue_wait_s=8.0)], 64, clock=clock)
    for i in range(10):
        s.add_request(make_request(f"r{i}"))  # no rate yet: no wait to refuse on
    finish(s, ["r0", "r1", "r2", "r3", "r4"], clock, [2.0, 4.0, 6.0, 8.0, 10.0])
    # 5 finished in 10 s (0.5/s); 5 wait: 10 s, over the bound of 8 s
    with pytest.raises(QueueFullError) as e:
        s.add_request(make_request("late"))
    assert (str(e.value), e.value.param, e.value.retry_after) == (
        "a: 5 requests already waiting, about 10 s at its recent rate; over its "
        "max_queue_wait_s (8 s)",
        "model",
        10,
    )
    finish(s, ["r5"], clock, [12.0])  # 6 in 12 s, 4 waiting: 8 s, within the bound
    s.add_request(make_request("in-time"))
    assert [r.request_id for r in s.queues["a"].waiting] == ["r6", "r7", "r8", "r9", "in-time"]


def test_a_full_queue_says_how_long_it_takes_and_aborts_do_not_count() -> None:
    clock = Clock()
    s = make_scheduler([make_slot("a", max_waiting=6)], 64, clock=clock)
    for i in range(6):
        s.add_request(make_request(f"r{i}"))
    with pytest.raises(QueueFullError) as e:
        s.add_request(make_request("x"))
    assert e.value.retry_after == 1  # nothing finished yet: no estimate
    clock.now = 1.0
    for rid in ["r0", "r1"]:
        s.abort(rid)  # clients that left say nothing of the service rate
    finish(s, ["r2", "r3", "r4", "r5"], clock, [3.0, 5.0, 7.0, 8.0])
    for i in range(6):
        s.add_request(make_request(f"q{i}"))
    with pytest.raises(QueueFullError) as e:
        s.add_request(make_request("y"))
    # 4 finished in 8 s (0.5/s): the 6 waiting take 12 s
    assert (str(e.value), e.value.retry_after) == ("a: 6 requests already waiting", 12)


def test_overdue_requests_are_those_past_the_limit_and_not_in_a_job() -> None:
    clock = Clock()
    s = make_scheduler([make_slot("a")], 64, clock=clock)
    for rid, arrival in (("old", 0.0), ("mid", 5.0), ("new", 9.0)):
        s.add_request(make_request(rid, arrival=arrival))
    clock.now = 10.0
    assert s.overdue(4.0) == ["old", "mid"]  # arrived before 6.0
    [job] = s.schedule()  # all three in one prefill job: in flight, not overdue now
    assert {q.request_id for q in job.seqs} == {"old", "mid", "new"}
    assert s.overdue(4.0) == []
    s.finish("old", FinishReason.TIMEOUT)  # its job is still out: it ends when the job returns
    assert s.get("old") is not None and s.get("old").pending_finish is FinishReason.TIMEOUT
