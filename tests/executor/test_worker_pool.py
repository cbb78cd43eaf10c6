"""A pooled worker's engine-side bookkeeping, without a process: which models it serves, which
attaches the process has not acknowledged yet, the order its jobs go out in, and what its class
is (tests/executor/test_mps_pool.py runs it)."""

from __future__ import annotations

from typing import Any, cast

import pytest
import torch

from muxserve.config import SMShare
from muxserve.executor.base import ModelSpec
from muxserve.executor.messages import Attach, Attached, PoolInit, Report, WorkerReady, WorkerReport
from muxserve.executor.worker_pool import PooledWorker, pooled_worker_for
from muxserve.executor.worker_unit import GroupState
from muxserve.runner.kv_pool import KVPool
from muxserve.scheduler.job import Job, Phase


def unit() -> PooledWorker:
    init = PoolInit("pool-decode-t1", Phase.DECODE, torch.zeros(8, dtype=torch.uint8), 4, 1)
    return PooledWorker(cast(Any, None), "pool-decode-t1", Phase.DECODE, init, {})


def attach(name: str) -> Attach:
    return Attach(name, cast(Any, None), cast(Any, None), cast(Any, None), torch.float32)


def job(job_id: int, model: str) -> Job:
    return Job(job_id, model, Phase.DECODE, (), 0.5)


def test_members_come_and_go_with_their_mirrors() -> None:
    u = unit()
    u.attach(attach("a"))
    u.attach(attach("b"))
    assert (sorted(u.members), len(u.all_mirrors()), len(u.mirrors_of("a"))) == (["a", "b"], 2, 1)
    u.detach("a")
    u.detach("a")  # twice: nothing more happens
    assert (sorted(u.members), u.mirrors_of("a"), u.state) == (["b"], [], GroupState.STOPPED)


def test_jobs_of_different_models_queue_in_arrival_order() -> None:
    u = unit()
    u.assign(job(1, "a"))
    u.assign(job(2, "b"))
    u.assign(job(3, "c"))
    assert (u.busy, u.delivered) == (True, False)  # stopped: nothing went out
    first = u.take_job()
    assert (first.job_id if first else None, u.job.job_id if u.job else None) == (1, 2)
    assert [j.job_id for j in u.take_all()] == [2, 3]
    assert (u.busy, u.take_job(), u.take_all()) == (False, None, [])


def spec(name: str, prefill: float, decode: float) -> ModelSpec:
    return ModelSpec(
        name,
        cast(Any, None),
        cast(Any, None),
        cast(Any, None),
        torch.float32,
        SMShare(prefill=prefill, decode=decode),
    )


def test_models_of_one_share_class_share_a_worker_and_others_do_not() -> None:
    pools: dict[Any, PooledWorker] = {}
    kv = KVPool(4, 64, torch.device("cpu"))
    env = lambda share, threads: {"OMP_NUM_THREADS": str(threads)}  # noqa: E731
    cores = 4  # the class is the thread count a share gives on these cores

    def worker(s: ModelSpec, phase: Phase) -> PooledWorker:
        return pooled_worker_for(pools, cast(Any, None), s, phase, kv, env, cores)

    a, b, c = spec("a", 0.5, 0.5), spec("b", 0.5, 0.5), spec("c", 0.5, 1.0)
    assert worker(a, Phase.DECODE) is worker(b, Phase.DECODE)
    assert worker(a, Phase.PREFILL) is worker(c, Phase.PREFILL)
    assert worker(a, Phase.DECODE) is not worker(c, Phase.DECODE)
    assert worker(a, Phase.DECODE) is not worker(a, Phase.PREFILL)
    labels = sorted(u.label for u in pools.values())
    assert labels == ["pool-decode-t2", "pool-decode-t4", "pool-prefill-t2"]


def test_a_report_of_a_stopped_worker_is_none_and_of_a_busy_one_refused() -> None:
    u = unit()
    assert u.report() is None
    u.state = GroupState.READY  # as if started, with a job on its way
    u.job = job(1, "a")
    with pytest.raises(RuntimeError, match="busy"):
        u.report()


class FakeConn:
    """The engine's end of a pooled worker's pipe: what was sent, and what comes back."""

    def __init__(self, *inbox: object) -> None:
        self.sent: list[object] = []
        self.inbox = list(inbox)

    def send(self, msg: object) -> None:
        self.sent.append(msg)

    def recv(self) -> object:
        return self.inbox.pop(0)

    def poll(self, timeout: float = 0.0) -> bool:
        return bool(self.inbox)


def test_an_attach_is_pending_until_the_process_acknowledges_it() -> None:
    u, conn = unit(), FakeConn()
    u.attach(attach("asleep-then-started"))  # stopped: its next start's init carries it
    assert not u.attaching("asleep-then-started")
    u.state, u.conns = GroupState.READY, cast(Any, [conn])
    u.attach(attach("a"))
    assert ([type(m).__name__ for m in conn.sent], u.attaching("a")) == (["Attach"], True)
    conn.inbox = [Attached("a")]
    assert u.on_readable(cast(Any, conn)) == Attached("a")
    assert not u.attaching("a") and u.attach_errors == {}
    u.attach(attach("b"))
    conn.inbox = [Attached("b", "RuntimeError: boom")]
    u.on_readable(cast(Any, conn))
    assert (u.attaching("b"), u.attach_errors) == (False, {"b": "RuntimeError: boom"})
    u.attach(attach("b"))  # attached again: the old error is gone
    assert (u.attaching("b"), u.attach_errors) == (True, {})
    u.detach("b")  # nothing to wait for any more
    assert not u.attaching("b")


def test_ready_acknowledges_the_init_but_not_what_waited_for_it() -> None:
    u, conn = unit(), FakeConn(WorkerReady(1))
    u.state, u.conns = GroupState.STARTING, cast(Any, [conn])
    u.attach(attach("late"))  # after the init went out: sent once the process is ready
    assert u.attaching("late") and conn.sent == []
    assert u.on_readable(cast(Any, conn)) is None
    assert u.state is GroupState.READY and [m.name for m in cast(Any, conn.sent)] == ["late"]
    assert u.attaching("late")  # sent now, built after
    report = WorkerReport(1, (("late", 64),))
    conn.inbox = [Attached("late"), report]  # an ack nobody waited for, then the report
    assert u.report() == report and not u.attaching("late")
    assert isinstance(conn.sent[-1], Report)
