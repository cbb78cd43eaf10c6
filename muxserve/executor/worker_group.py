"""The engine's handle on the worker processes of one (model, phase): one per TP rank.

It starts them, feeds them jobs (encoded per rank by its `WorkerMirror`), turns their answers
and their deaths into events, and restarts them. All ranks of a group live and die together:
a tensor-parallel job needs every rank, so a rank that dies takes its group's job with it.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import socket
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess
from typing import cast

from muxserve.errors import exit_cause
from muxserve.executor.messages import (
    Stop,
    WorkerInit,
    WorkerReady,
    WorkerStartFailed,
)
from muxserve.executor.mirror import WorkerMirror
from muxserve.executor.worker import worker_main
from muxserve.scheduler.job import Job, JobResult, Phase

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 5.0  # a worker not gone this long after `Stop` is killed


class GroupState(enum.Enum):
    STARTING = "starting"  # spawned; not every rank said WorkerReady yet
    READY = "ready"
    STOPPED = "stopped"


@dataclass(frozen=True)
class RankPlan:
    """How to start one rank's worker: its init message (model shard, its rank's pool) and
    environment."""

    init: WorkerInit
    env: dict[str, str]


@dataclass(frozen=True)
class WorkerDied:
    """A rank's process ended (or could not start); `reason` says how, for the error text."""

    reason: str
    during_start: bool


class WorkerGroup:
    """The processes of one (model, phase), one per tensor-parallel rank, run as one."""

    def __init__(self, ctx: SpawnContext, name: str, phase: Phase, ranks: list[RankPlan]) -> None:
        self.ctx = ctx
        self.name = name
        self.phase = phase
        self.ranks = ranks
        self.mirrors = [WorkerMirror() for _ in ranks]
        self.state = GroupState.STOPPED
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []
        self.job: Job | None = None  # the job given to this group, until its result comes
        self._sent = False  # the job went out (the group was ready)
        self.sent_at = 0.0  # time.monotonic() when it went out: the watchdog's clock
        self.jobs_done = 0  # results since the workers started (the first job is slower)
        self.started_at = 0.0  # time.monotonic() of the last start: the start's deadline
        self.idle_since = 0.0  # time.monotonic() since which it has had no job
        self.start_reason: str | None = None  # why it restarts (a failure); None: on demand
        self._senders: list[threading.Thread] = []  # each rank's WorkerInit on its way
        self._ready: set[int] = set()
        self.failed_starts = 0  # starts in a row that ended before every rank was ready
        self.broken: str | None = None  # why the group gave up restarting; jobs fail at once

    @property
    def label(self) -> str:
        return f"{self.name}/{self.phase.value}"

    @property
    def can_start(self) -> bool:
        """It has ranks to start (an asleep model's groups have none)."""
        return bool(self.ranks)

    @property
    def busy(self) -> bool:
        return self.job is not None

    def mirrors_of(self, model: str) -> list[WorkerMirror]:
        """The mirrors of `model`'s requests: one per rank (the group serves only it)."""
        return self.mirrors

    def all_mirrors(self) -> list[WorkerMirror]:
        return self.mirrors

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Spawn every rank and send its init; answers come through `on_readable`."""
        port = _free_port() if len(self.ranks) > 1 else 0
        for rank, plan in enumerate(self.ranks):
            parent, child = self.ctx.Pipe()
            proc = self.ctx.Process(
                target=worker_main,
                args=(child, plan.env),
                name=f"muxserve-{self.name}-{self.phase.value}-{rank}",
                daemon=True,  # never outlives the engine process
            )
            proc.start()
            child.close()
            init = plan.init
            if init.tp is not None:
                init = replace(init, tp=replace(init.tp, init_method=f"tcp://127.0.0.1:{port}"))
            # A large model's init is more than a pipe holds, and the child reads it only once
            # it has imported torch (seconds; far more on a loaded host, or never if it is
            # stopped): sent from the engine's loop it would stall every model meanwhile.
            sender = threading.Thread(
                target=send_init, args=(parent, init), name=f"{proc.name}-init", daemon=True
            )
            sender.start()
            self._senders.append(sender)
            self.procs.append(proc)
            self.conns.append(parent)
        self.state = GroupState.STARTING
        self.started_at = time.monotonic()
        self._ready.clear()
        self.jobs_done = 0

    def stop(self) -> None:
        """Ask every rank to exit, kill those that do not, and close the pipes; a later
        `start` begins with workers that hold nothing."""
        reap(self.retire())

    def retire(self) -> list[BaseProcess]:
        """Ask every rank to exit and let go of them at once: the group is stopped (a later
        `start` begins afresh) and the processes, still exiting, are the caller's to `reap`,
        so a caller that must not wait (the engine's loop) need not."""
        for conn in self.conns:
            with contextlib.suppress(OSError):  # already gone
                conn.send(Stop())  # read before the closed pipe's end of file
            conn.close()
        procs = self.procs
        self.procs, self.conns, self._senders = [], [], []  # senders end with their reader
        for m in self.mirrors:
            m.reset()
        self.state = GroupState.STOPPED
        return procs

    def kill(self) -> None:
        """End every rank now (one died: the others cannot finish a job without it)."""
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(STOP_TIMEOUT_S)
        self._reap()
        for m in self.mirrors:
            m.reset()
        self.state = GroupState.STOPPED

    def _reap(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join(STOP_TIMEOUT_S)
            proc.close()
        for sender in self._senders:  # its reader is gone: the send ends with an error now
            sender.join(STOP_TIMEOUT_S)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns, self._senders = [], [], []

    def wait_ready(self, timeout: float) -> WorkerDied | None:
        """After `start`, read the ranks' answers until all are ready (None) or one fails.

        For a group no poll watches yet (a wake starts it before installing it), so that the
        wake, not the model's first job, pays for the start."""
        deadline = time.monotonic() + timeout
        while self.state is GroupState.STARTING:
            left = deadline - time.monotonic()
            if left <= 0:
                return WorkerDied(f"not ready after {timeout:.0f} s", during_start=True)
            for obj in wait(self.waitables(), left):
                event = self.on_readable(cast(Connection | int, obj))
                if isinstance(event, WorkerDied):
                    return event
                if self.state is not GroupState.STARTING:
                    break
        return None

    # ---- jobs --------------------------------------------------------------------------
    def take_all(self) -> list[Job]:
        """Every job held (at most one): the group gave up, they fail."""
        job = self.take_job()
        return [] if job is None else [job]

    def assign(self, job: Job) -> None:
        """Take a job; it goes out now if every rank is ready, else when they are."""
        if self.job is not None:
            raise RuntimeError(f"{self.label}: job {self.job.job_id} still running")
        self.job, self._sent = job, False
        if self.state is GroupState.READY:
            self._dispatch()

    def _dispatch(self) -> None:
        assert self.job is not None
        if not all(proc.is_alive() for proc in self.procs):
            # a rank died since it was ready: send to none (the others would fail the job at
            # their first collective); its death comes through `on_readable`, the job is kept
            return
        try:
            for conn, mirror in zip(self.conns, self.mirrors, strict=True):
                conn.send(mirror.encode(self.job))
        except OSError:
            return  # a rank is gone: its death comes through `on_readable`, the job is kept
        self._sent = True
        self.sent_at = time.monotonic()

    @property
    def delivered(self) -> bool:
        """The group's job reached every rank (it may have run, partly or all)."""
        return self.job is not None and self._sent

    def take_job(self) -> Job | None:
        """Take back the group's job (finished, or never to finish: its workers are gone)."""
        job, self.job = self.job, None
        return job

    # ---- events ------------------------------------------------------------------------
    def waitables(self) -> list[Connection | int]:
        """What `multiprocessing.connection.wait` watches for this group: pipes, then deaths."""
        return [*self.conns, *(p.sentinel for p in self.procs)]

    def on_readable(self, obj: Connection | int) -> tuple[Job, JobResult] | WorkerDied | None:
        """Handle one ready waitable: a finished job, a death, or nothing to report."""
        if isinstance(obj, int):
            return self._died(self.procs[[p.sentinel for p in self.procs].index(obj)])
        rank = self.conns.index(obj)
        try:
            msg = obj.recv()
        except (EOFError, OSError):
            return self._died(self.procs[rank])
        if isinstance(msg, WorkerReady):
            self._ready.add(rank)
            if len(self._ready) == len(self.ranks):
                self.state = GroupState.READY
                self.failed_starts = 0
                self.start_reason = None
                self.idle_since = time.monotonic()
                log.info("%s: %d worker(s) ready", self.label, len(self.ranks))
                if self.job is not None and not self._sent:
                    self._dispatch()
            return None
        if isinstance(msg, WorkerStartFailed):
            return WorkerDied(f"could not start: {msg.error}", during_start=True)
        if isinstance(msg, JobResult):
            self.jobs_done += 1
            self.idle_since = time.monotonic()
            job = self.take_job()
            if job is None or job.job_id != msg.job_id:
                raise RuntimeError(f"{self.label}: result for job {msg.job_id}, expected {job}")
            return job, msg
        raise TypeError(f"{self.label}: unexpected message {type(msg).__name__}")

    def _died(self, proc: BaseProcess) -> WorkerDied:
        proc.join(STOP_TIMEOUT_S)
        return WorkerDied(
            f"worker {proc.name} (pid {proc.pid}) ended with {exit_cause(proc.exitcode)}",
            during_start=self.state is GroupState.STARTING,
        )


def reap(procs: list[BaseProcess], timeout: float = STOP_TIMEOUT_S) -> None:
    """Wait for exiting workers (those given `Stop`), kill any still there after `timeout`,
    and release them."""
    end = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, end - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(STOP_TIMEOUT_S)
        proc.close()


def send_init(conn: Connection, init: object) -> None:
    """Send a worker its init message (a thread's whole life: a large model's init is bigger
    than a pipe holds). A worker gone first is no error here: its death reaches the engine
    through the process sentinel."""
    with contextlib.suppress(OSError):
        conn.send(init)


def _free_port() -> int:
    """A TCP port free right now on the loopback, for a group's torch.distributed rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
