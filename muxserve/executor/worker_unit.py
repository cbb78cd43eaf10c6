"""What the mps executor drives: a unit of worker processes that runs jobs, one at a time.

Two kinds share it: a model's own `WorkerGroup` (one process per TP rank, all alive or all
gone) and a `PooledWorker` (one process serving several models). This base holds what they do
alike: the state and clocks the executor and its watchdog read, spawning a process with its
init, stopping or killing the processes, and reading their answers (ready, start failed,
result, death); a kind adds how its jobs are held and encoded, and its own messages.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess
from typing import TypeVar, cast

from muxserve.errors import exit_cause
from muxserve.executor.messages import Attached, Stop, WorkerReady, WorkerStartFailed
from muxserve.executor.mirror import WorkerMirror
from muxserve.scheduler.job import Job, JobResult, Phase

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 5.0  # a worker not gone this long after `Stop` is killed

Waitable = Connection | int  # a worker's pipe, or a process sentinel


class GroupState(enum.Enum):
    STARTING = "starting"  # spawned; not every process said WorkerReady yet
    READY = "ready"
    STOPPED = "stopped"


@dataclass(frozen=True)
class WorkerDied:
    """A unit's process ended (or could not start); `reason` says how, for the error text."""

    reason: str
    during_start: bool


class WorkerUnit:
    """The processes of one unit, their state, their job's clocks, and their answers."""

    def __init__(self, ctx: SpawnContext, name: str, phase: Phase) -> None:
        self.ctx = ctx
        self.name = name
        self.phase = phase
        self.state = GroupState.STOPPED
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []
        self.job: Job | None = None  # the job given to this unit (at its head), until its result
        self._sent = False  # the job went out (the unit was ready)
        self.sent_at = 0.0  # time.monotonic() when it went out: the watchdog's clock
        self.jobs_done = 0  # results since the workers started (the first job is slower)
        self.started_at = 0.0  # time.monotonic() of the last start: the start's deadline
        self.idle_since = 0.0  # time.monotonic() since which it has had no job
        self.start_reason: str | None = None  # why it restarts (a failure); None: on demand
        self._senders: list[threading.Thread] = []  # each process's init on its way
        self._ready: set[int] = set()  # the processes (by index) that said WorkerReady
        self.failed_starts = 0  # starts in a row that ended before every process was ready
        self.broken: str | None = None  # why the unit gave up restarting; jobs fail at once

    # ---- what a kind says about itself -----------------------------------------------------
    @property
    def label(self) -> str:
        return self.name

    @property
    def width(self) -> int:
        """How many processes a start spawns (each must be ready)."""
        return 1

    @property
    def can_start(self) -> bool:
        """Whether `start` has processes to spawn (an asleep model's group has none)."""
        raise NotImplementedError

    def mirrors_of(self, model: str) -> list[WorkerMirror]:
        """The mirrors of `model`'s requests here (none: the model is not served here)."""
        raise NotImplementedError

    def all_mirrors(self) -> list[WorkerMirror]:
        raise NotImplementedError

    def _job_mirrors(self, job: Job) -> list[WorkerMirror]:
        """The mirrors that encode `job`, one per process, in the order of `conns`."""
        raise NotImplementedError

    def _on_ready(self) -> None:
        """Every process said WorkerReady (the unit is READY): what the kind does then."""

    def _other_message(self, msg: object) -> Attached | None:
        """A message this base does not know: the kind's, or a protocol error."""
        raise TypeError(f"{self.label}: unexpected message {type(msg).__name__}")

    def _describe(self, proc: BaseProcess) -> str:
        """The process, for a death's error text."""
        return f"worker {proc.name} (pid {proc.pid})"

    # ---- lifecycle -------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.job is not None

    @property
    def delivered(self) -> bool:
        """The unit's job reached every process (it may have run, partly or all)."""
        return self.job is not None and self._sent

    def _spawn(
        self, target: Callable[..., None], env: dict[str, str], init: object, name: str
    ) -> None:
        """Start one process and send its init from a thread: a large model's init is more
        than a pipe holds, and the child reads it only once it has imported torch (seconds;
        far more on a loaded host, or never if it is stopped), so sent from the engine's loop
        it would stall every model meanwhile."""
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(
            target=target,
            args=(child, env),
            name=name,
            daemon=True,  # never outlives the engine
        )
        proc.start()
        child.close()
        sender = threading.Thread(
            target=send_init, args=(parent, init), name=f"{proc.name}-init", daemon=True
        )
        sender.start()
        self._senders.append(sender)
        self.procs.append(proc)
        self.conns.append(parent)

    def start(self) -> None:
        """Spawn the processes and send their inits; their answers come through
        `on_readable` (the unit is STARTING until every one is ready)."""
        raise NotImplementedError

    def _check_stopped(self) -> None:
        """Before a start: `_spawn` appends to `procs`, so a start over processes still there
        would lose track of them (they would outlive the unit)."""
        if self.state is not GroupState.STOPPED or self.procs:
            raise RuntimeError(
                f"{self.label}: started while {self.state.value} with {len(self.procs)} "
                "process(es); stop or kill it first"
            )

    def _starting(self) -> None:
        """Every process is spawned: wait for their WorkerReady."""
        self.state = GroupState.STARTING
        self.started_at = time.monotonic()
        self._ready.clear()
        self.jobs_done = 0

    def stop(self) -> None:
        """Ask every process to exit, kill those that do not, and close the pipes: the
        executor shuts down, so the jobs held (if any) go with it."""
        self.take_all()
        reap(self.retire())

    def retire(self) -> list[BaseProcess]:
        """Ask every process to exit and let go of them at once: the unit is stopped (a later
        `start` begins afresh) and the processes, still exiting, are the caller's to `reap`,
        so a caller that must not wait (the engine's loop) need not.

        Only an idle unit retires (an idle stop; a sleep or a removal, which wait until the
        model has no request in flight): a job held would never get its result."""
        if self.job is not None:
            raise RuntimeError(f"{self.label}: retired holding job {self.job.job_id}")
        for conn in self.conns:
            with contextlib.suppress(OSError):  # already gone
                conn.send(Stop())  # read before the closed pipe's end of file
            conn.close()
        procs = self.procs
        self.procs, self.conns, self._senders = [], [], []  # senders end with their reader
        self._reset()
        return procs

    def kill(self) -> None:
        """End every process now (one died or hung: a unit lives and dies whole)."""
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        reap(self.procs)  # killed: they end at once
        for sender in self._senders:  # its reader is gone: the send ends with an error now
            sender.join(STOP_TIMEOUT_S)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns, self._senders = [], [], []
        self._reset()

    def _reset(self) -> None:
        """The processes are gone: what they held is gone with them."""
        for m in self.all_mirrors():
            m.reset()
        self._sent = False
        self.state = GroupState.STOPPED

    # ---- jobs ------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        assert self.job is not None
        if not all(proc.is_alive() for proc in self.procs):
            # a process died since it was ready: send to none (the others would fail the job
            # at their first collective); its death comes through `on_readable`, the job is kept
            return
        try:
            for conn, mirror in zip(self.conns, self._job_mirrors(self.job), strict=True):
                conn.send(mirror.encode(self.job))
        except OSError:
            return  # a process is gone: its death comes through `on_readable`, the job is kept
        self._sent = True
        self.sent_at = time.monotonic()

    def _free(self) -> None:
        """The processes wait for their next message: the job waiting for them goes out."""
        if self.job is not None and not self._sent:
            self._dispatch()

    def assign(self, job: Job) -> None:
        """Take a job; it goes out when the processes are ready and free."""
        raise NotImplementedError

    def take_job(self) -> Job | None:
        """Take back the job at the head (finished, or lost with the processes)."""
        raise NotImplementedError

    def take_all(self) -> list[Job]:
        """Every job held, head first (the unit gave up: they fail)."""
        raise NotImplementedError

    # ---- events ----------------------------------------------------------------------------
    def waitables(self) -> list[Waitable]:
        """What `multiprocessing.connection.wait` watches for this unit: pipes, then deaths."""
        return [*self.conns, *(p.sentinel for p in self.procs)]

    def on_readable(self, obj: Waitable) -> tuple[Job, JobResult] | WorkerDied | Attached | None:
        """Handle one ready waitable: a finished job (the next one goes out), a death, a
        pooled worker's acknowledged attach (a waking thread may be waiting for it), or
        nothing to report."""
        if isinstance(obj, int):
            return self._died(self.procs[[p.sentinel for p in self.procs].index(obj)])
        index = self.conns.index(obj)
        try:
            msg = obj.recv()
        except (EOFError, OSError):
            return self._died(self.procs[index])
        if isinstance(msg, WorkerReady):
            self._ready.add(index)
            if len(self._ready) == self.width:
                self.state = GroupState.READY
                self.failed_starts = 0
                self.start_reason = None
                self.idle_since = time.monotonic()
                self._on_ready()
                self._free()
            return None
        if isinstance(msg, WorkerStartFailed):
            return WorkerDied(f"could not start: {msg.error}", during_start=True)
        if isinstance(msg, JobResult):
            self.jobs_done += 1
            self.idle_since = time.monotonic()
            job = self.take_job()
            if job is None or job.job_id != msg.job_id:
                raise RuntimeError(f"{self.label}: result for job {msg.job_id}, expected {job}")
            self._free()
            return job, msg
        return self._other_message(msg)

    def _died(self, proc: BaseProcess) -> WorkerDied:
        proc.join(STOP_TIMEOUT_S)
        return WorkerDied(
            f"{self._describe(proc)} ended with {exit_cause(proc.exitcode)}",
            during_start=self.state is GroupState.STARTING,
        )


U = TypeVar("U", bound=WorkerUnit)


def wait_ready(units: Sequence[U], timeout: float) -> list[tuple[U, WorkerDied]]:
    """After their `start`, read the units' answers until each is ready or has failed, all
    under one deadline; the failed ones, each with why (a unit still starting at the deadline:
    "not ready after ..."), in the order of `units`.

    For units no poll watches yet (a wake starts its groups before installing them), so that
    the wake, not the model's first job, pays for the start, and several units' starts overlap.
    """
    deadline = time.monotonic() + timeout
    failed: dict[int, WorkerDied] = {}
    while starting := [u for u in units if u.state is GroupState.STARTING and id(u) not in failed]:
        left = deadline - time.monotonic()
        if left <= 0:
            for u in starting:
                failed[id(u)] = WorkerDied(f"not ready after {timeout:.0f} s", during_start=True)
            break
        owners = {obj: u for u in starting for obj in u.waitables()}
        for obj in wait_any(list(owners), left):
            unit = owners[obj]
            if id(unit) in failed or unit.state is not GroupState.STARTING:
                continue  # given up on, or ready: the poll reads the rest once it is installed
            event = unit.on_readable(obj)
            if isinstance(event, WorkerDied):
                failed[id(unit)] = event
    return [(u, failed[id(u)]) for u in units if id(u) in failed]


def wait_any(objs: list[Waitable], timeout: float) -> list[Waitable]:
    """`multiprocessing.connection.wait`, typed for what we give it: those of `objs` that are
    ready (empty after `timeout`)."""
    return cast(list[Waitable], wait(objs, timeout))


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
