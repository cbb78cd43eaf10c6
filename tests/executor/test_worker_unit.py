"""Waiting for freshly started worker units (a wake's groups): one deadline for them all, and
each failure named by its unit (a process that dies while starting too)."""

from __future__ import annotations

import multiprocessing
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from muxserve.executor import worker_unit
from muxserve.executor.messages import WorkerReady, WorkerStartFailed
from muxserve.executor.mirror import WorkerMirror
from muxserve.executor.worker_unit import GroupState, WorkerDied, WorkerUnit, wait_ready
from muxserve.scheduler.job import Job, Phase


class FakeUnit(WorkerUnit):
    """A started unit of one process whose engine end of the pipe is `conn`."""

    def __init__(self, name: str, conn: Connection) -> None:
        super().__init__(cast(Any, None), name, Phase.DECODE)
        self.conns = [conn]
        self.state = GroupState.STARTING

    def all_mirrors(self) -> list[WorkerMirror]:
        return []

    def _job_mirrors(self, job: Job) -> list[WorkerMirror]:
        return []

    def take_all(self) -> list[Job]:
        jobs = [] if self.job is None else [self.job]
        self.job = None
        return jobs


def exit_with_3(conn: Connection, env: dict[str, str]) -> None:
    """A worker's whole life: it ends at once, with exit code 3, before any answer."""
    raise SystemExit(3)


class ExitingUnit(FakeUnit):
    """A unit of one real process that exits with code 3 while starting."""

    def __init__(self, name: str) -> None:
        WorkerUnit.__init__(self, multiprocessing.get_context("spawn"), name, Phase.DECODE)

    def start(self) -> None:
        self._check_stopped()
        self._spawn(exit_with_3, {}, None, f"muxserve-{self.name}")
        self._starting()


def started(name: str, answer: object | None) -> tuple[FakeUnit, Connection]:
    """A unit and its process's end of the pipe, on which `answer` (if any) is already sent."""
    ours, theirs = Pipe()
    if answer is not None:
        theirs.send(answer)
    return FakeUnit(name, ours), theirs


def test_each_failed_unit_is_named_and_the_others_get_ready() -> None:
    a, a_end = started("a/decode", WorkerStartFailed("RuntimeError: boom"))
    b, b_end = started("b/decode", WorkerReady(1))
    c, c_end = started("c/decode", WorkerStartFailed("OSError: no shm"))
    failed = wait_ready([a, b, c], 60.0)
    assert [(u.label, d) for u, d in failed] == [
        ("a/decode", WorkerDied("could not start: RuntimeError: boom", during_start=True)),
        ("c/decode", WorkerDied("could not start: OSError: no shm", during_start=True)),
    ]
    assert [u.state for u in (a, b, c)] == [
        GroupState.STARTING,  # the caller kills it
        GroupState.READY,
        GroupState.STARTING,
    ]
    for end in (a_end, b_end, c_end, *a.conns, *b.conns, *c.conns):
        end.close()


def test_units_are_waited_for_under_one_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two units that never answer: one wait, on both, for the whole timeout (not one timeout
    each), then both are named as not ready. The clock is a stand-in that each wait moves."""
    clock = SimpleNamespace(now=100.0)
    waits: list[tuple[int, float]] = []

    def fake_wait(objs: list[object], timeout: float) -> list[object]:
        waits.append((len(objs), timeout))
        clock.now += timeout  # nothing arrived meanwhile
        return []

    monkeypatch.setattr(worker_unit, "time", SimpleNamespace(monotonic=lambda: clock.now))
    monkeypatch.setattr(worker_unit, "wait", fake_wait)
    (a, a_end), (b, b_end) = started("a/prefill", None), started("a/decode", None)
    failed = wait_ready([a, b], 10.0)
    assert waits == [(2, 10.0)] and clock.now == 110.0
    not_ready = WorkerDied("not ready after 10 s", during_start=True)
    assert [(u.label, d) for u, d in failed] == [("a/prefill", not_ready), ("a/decode", not_ready)]
    for end in (a_end, b_end, *a.conns, *b.conns):
        end.close()


def test_nothing_started_is_nothing_to_wait_for() -> None:
    a, a_end = started("a/decode", None)
    a.state = GroupState.STOPPED  # an asleep model's group: never started
    assert wait_ready([a], 0.0) == []
    assert wait_ready([], 0.0) == []
    a_end.close()
    a.conns[0].close()


def test_a_process_that_dies_while_starting_is_named_with_its_exit_code() -> None:
    dying = ExitingUnit("a/decode")
    dying.start()
    with pytest.raises(RuntimeError, match=r"a/decode: started while starting with 1 process"):
        dying.start()  # over a live process: it would be lost
    ready, ready_end = started("b/decode", WorkerReady(1))
    pid = dying.procs[0].pid
    failed = wait_ready([dying, ready], 60.0)
    died = WorkerDied(f"worker muxserve-a/decode (pid {pid}) ended with exit code 3", True)
    assert [(u.label, d) for u, d in failed] == [("a/decode", died)]
    assert [dying.state, ready.state] == [GroupState.STARTING, GroupState.READY]
    dying.kill()  # what the caller does with a failed unit
    assert (dying.state, dying.procs) == (GroupState.STOPPED, [])
    assert not Path(f"/proc/{pid}").exists()
    for end in (ready_end, *ready.conns):
        end.close()


def test_only_an_idle_unit_retires_and_a_stop_drops_its_job() -> None:
    """A job held by a retiring unit would never get its result: refused, naming it; a stop
    (the executor shuts down) lets the job go with it."""
    a, a_end = started("a/decode", None)
    a.job = cast(Job, SimpleNamespace(job_id=7))
    with pytest.raises(RuntimeError, match="a/decode: retired holding job 7"):
        a.retire()
    a.stop()
    assert (a.job, a.state, a.conns) == (None, GroupState.STOPPED, [])
    a_end.close()
