"""The engine's handle on one pooled worker process: several models' jobs in one phase.

With `engine.worker_pool: shared` each mesh rank has one worker per (phase, SM-share class)
instead of one per (model, phase): models attach to it (`Attach`, on start and on wake) and
detach from it on sleep. It keeps the scheduler's view: a (model, phase) still has one job at
a time; jobs of different models wait here, in arrival order, and go to the process one at a
time, so the watchdog's clock (`sent_at`) is the running job's. It offers the executor the same
surface as a `WorkerGroup` (state, job, delivered, on_readable, start, retire, kill, ...).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess

from muxserve.errors import exit_cause
from muxserve.executor.base import ModelSpec, cpu_threads
from muxserve.executor.messages import (
    Attach,
    Attached,
    Detach,
    PoolInit,
    Report,
    Stop,
    WorkerReady,
    WorkerReport,
    WorkerStartFailed,
)
from muxserve.executor.mirror import WorkerMirror
from muxserve.executor.pool_worker import pool_worker_main
from muxserve.executor.worker_group import (
    STOP_TIMEOUT_S,
    GroupState,
    WorkerDied,
    reap,
    send_init,
)
from muxserve.models.causal_lm import CausalLM
from muxserve.runner.kv_pool import KVPool
from muxserve.scheduler.job import Job, JobResult, Phase

log = logging.getLogger(__name__)

REPORT_TIMEOUT_S = 30.0  # a pooled worker answers a `Report` within this
PoolKey = tuple[Phase, tuple[tuple[str, str], ...]]  # (phase, its class's environment)


class PooledWorker:
    """One worker process of a (phase, SM-share class) and the models attached to it."""

    def __init__(
        self,
        ctx: SpawnContext,
        label: str,
        phase: Phase,
        pool: PoolInit,
        env: dict[str, str],
    ) -> None:
        self.ctx = ctx
        self.name = label
        self.phase = phase
        self._init = pool  # its `attach` is set from `members` at each start
        self.env = env
        self.members: dict[str, Attach] = {}  # attached models (awake), re-attached on restart
        self.mirrors: dict[str, WorkerMirror] = {}  # per model: what the process holds of it
        self._pending: list[Attach | Detach] = []  # made while it starts or runs a job
        # attached models the process has not acknowledged yet (`Attached`, or its `WorkerReady`
        # after an init that carried them): a wake waits for them (the model's build)
        self._unacked: set[str] = set()
        self.attach_errors: dict[str, str] = {}  # models the process could not attach, why
        self.state = GroupState.STOPPED
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []
        self.job: Job | None = None  # the job at the head: running, or next to go out
        self._queue: deque[Job] = deque()  # other models' jobs waiting for this process
        self._sent = False
        self.sent_at = 0.0
        self.jobs_done = 0
        self.started_at = 0.0
        self.idle_since = 0.0
        self.start_reason: str | None = None
        self._senders: list[threading.Thread] = []
        self.failed_starts = 0
        self.broken: str | None = None

    @property
    def label(self) -> str:
        return self.name

    can_start = True  # a pool runs whether or not a model is attached (a wake only attaches)

    # ---- models --------------------------------------------------------------------------
    def attach(self, msg: Attach) -> None:
        """Serve `msg.name` here from now on (sent now, at the running process's next read)."""
        self.members[msg.name] = msg
        self.mirrors[msg.name] = WorkerMirror()
        self.attach_errors.pop(msg.name, None)
        if self.state is not GroupState.STOPPED:  # stopped: its next start's init attaches it
            self._unacked.add(msg.name)
        self._change(msg)

    def attaching(self, model: str) -> bool:
        """Whether `model`'s attach is on its way to, or being built in, the running process."""
        return model in self._unacked

    def _acked(self, msg: Attached) -> None:
        self._unacked.discard(msg.name)
        if msg.error is not None:
            self.attach_errors[msg.name] = msg.error

    def detach(self, model: str) -> None:
        """Stop serving `model`: the process drops its weights (no job of it may be queued)."""
        if self.members.pop(model, None) is None:
            return
        self.mirrors.pop(model, None)
        self._unacked.discard(model)
        self._change(Detach(model))

    def _change(self, msg: Attach | Detach) -> None:
        if self.state is GroupState.READY and not self._sent:
            self._send(msg)  # the process is waiting for its next message: read at once
        elif self.state is not GroupState.STOPPED:
            # starting (after the init on its way), or running a job: sent, in order, when it
            # is free, so a message larger than the pipe holds never waits for a job here
            self._pending.append(msg)
        # stopped: the next start attaches `members`

    def _flush(self) -> None:
        """Send the attaches and detaches that waited for the process to be free."""
        pending, self._pending = self._pending, []
        for change in pending:
            self._send(change)

    def _send(self, msg: object) -> None:
        with contextlib.suppress(OSError):  # gone: its death comes through the sentinel
            self.conns[0].send(msg)

    def mirrors_of(self, model: str) -> list[WorkerMirror]:
        m = self.mirrors.get(model)
        return [] if m is None else [m]

    def all_mirrors(self) -> list[WorkerMirror]:
        return list(self.mirrors.values())

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Spawn the process and send its init with every member attached."""
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(
            target=pool_worker_main,
            args=(child, self.env),
            name=f"muxserve-{self.name}",
            daemon=True,
        )
        proc.start()
        child.close()
        init = replace(self._init, attach=tuple(self.members.values()))
        # sent from a thread: the process reads it only after its torch import (seconds)
        sender = threading.Thread(
            target=send_init, args=(parent, init), name=f"{proc.name}-init", daemon=True
        )
        sender.start()
        self._senders, self.procs, self.conns = [sender], [proc], [parent]
        self._pending = []
        self._unacked = set(self.members)  # its `WorkerReady` says they are built
        self.state = GroupState.STARTING
        self.started_at = time.monotonic()
        self.jobs_done = 0

    def stop(self) -> None:
        reap(self.retire())

    def retire(self) -> list[BaseProcess]:
        """Ask the process to exit and let go of it; members stay (attached at the next
        start). Only for an idle pool: its jobs, if any, would wait for that start."""
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(Stop())
            conn.close()
        procs = self.procs
        self.procs, self.conns, self._senders = [], [], []
        self._reset()
        return procs

    def kill(self) -> None:
        """End the process now (it died or hung); queued jobs wait for the next start."""
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join(STOP_TIMEOUT_S)
            proc.close()
        for sender in self._senders:
            sender.join(STOP_TIMEOUT_S)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns, self._senders = [], [], []
        self._reset()

    def _reset(self) -> None:
        for m in self.mirrors.values():
            m.reset()
        self._pending = []
        self._unacked = set()
        self._sent = False
        self.state = GroupState.STOPPED

    # ---- jobs ----------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.job is not None

    def assign(self, job: Job) -> None:
        """Queue a job behind the other models'; it goes out when the process is free."""
        if self.job is None:
            self.job, self._sent = job, False
            if self.state is GroupState.READY:
                self._dispatch()
        else:
            self._queue.append(job)

    def _dispatch(self) -> None:
        assert self.job is not None
        if not self.procs[0].is_alive():
            return  # its death comes through `on_readable`; the job is kept
        mirror = self.mirrors.get(self.job.model)
        if mirror is None:
            raise RuntimeError(
                f"{self.label}: job {self.job.job_id} of unattached {self.job.model}"
            )
        try:
            self.conns[0].send(mirror.encode(self.job))
        except OSError:
            return
        self._sent = True
        self.sent_at = time.monotonic()

    @property
    def delivered(self) -> bool:
        return self.job is not None and self._sent

    def take_job(self) -> Job | None:
        """Take back the head job; the next queued one becomes the head (not sent yet)."""
        job = self.job
        self.job = self._queue.popleft() if self._queue else None
        self._sent = False
        return job

    def take_all(self) -> list[Job]:
        """Every job held, head first (the pool gave up: they fail)."""
        jobs = [] if self.job is None else [self.job]
        jobs.extend(self._queue)
        self.job, self._sent = None, False
        self._queue.clear()
        return jobs

    # ---- events --------------------------------------------------------------------------
    def waitables(self) -> list[Connection | int]:
        return [*self.conns, *(p.sentinel for p in self.procs)]

    def on_readable(
        self, obj: Connection | int
    ) -> tuple[Job, JobResult] | WorkerDied | Attached | None:
        """Handle one ready waitable: a finished job (the next one goes out), a death, an
        acknowledged attach (a waking thread may be waiting for it), or nothing to report."""
        if isinstance(obj, int):
            return self._died()
        try:
            msg = obj.recv()
        except (EOFError, OSError):
            return self._died()
        if isinstance(msg, WorkerReady):
            self.state = GroupState.READY
            self.failed_starts = 0
            self.start_reason = None
            self.idle_since = time.monotonic()
            # its init's models are built; those attached since go out now and answer
            self._unacked &= {c.name for c in self._pending if isinstance(c, Attach)}
            log.info("%s: ready with %d model(s)", self.label, len(self.members))
            self._flush()
            if self.job is not None and not self._sent:
                self._dispatch()
            return None
        if isinstance(msg, WorkerStartFailed):
            return WorkerDied(f"could not start: {msg.error}", during_start=True)
        if isinstance(msg, Attached):
            self._acked(msg)
            return msg
        if isinstance(msg, JobResult):
            self.jobs_done += 1
            self.idle_since = time.monotonic()
            job = self.take_job()
            if job is None or job.job_id != msg.job_id:
                raise RuntimeError(f"{self.label}: result for job {msg.job_id}, expected {job}")
            self._flush()
            if self.job is not None:
                self._dispatch()
            return job, msg
        raise TypeError(f"{self.label}: unexpected message {type(msg).__name__}")

    def _died(self) -> WorkerDied:
        proc = self.procs[0]
        proc.join(STOP_TIMEOUT_S)
        served = ", ".join(sorted(self.members)) or "no model"
        cause = exit_cause(proc.exitcode)
        return WorkerDied(
            f"pooled worker {proc.name} (pid {proc.pid}, serving {served}) ended with {cause}",
            during_start=self.state is GroupState.STARTING,
        )

    def report(self, timeout: float = REPORT_TIMEOUT_S) -> WorkerReport | None:
        """Ask the idle, ready process what it holds (None: not running). The caller holds
        the executor's lock, so no poll reads this pipe meanwhile; idle, nothing else is
        on its way back."""
        if self.state is not GroupState.READY:
            return None
        if self.job is not None:
            raise RuntimeError(f"{self.label}: busy; ask again when it is idle")
        conn = self.conns[0]
        conn.send(Report())
        deadline = time.monotonic() + timeout
        while True:
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"{self.label}: no report after {timeout:.0f} s")
            msg = conn.recv()
            if not isinstance(msg, Attached):  # an ack nobody waited for is read on the way
                break
            self._acked(msg)
        if not isinstance(msg, WorkerReport):
            raise TypeError(f"{self.label}: expected WorkerReport, got {type(msg).__name__}")
        return msg


def attach_of(spec: ModelSpec, model: CausalLM) -> Attach:
    """The message that attaches `spec`'s loaded weights (`model`) to a pooled worker."""
    return Attach(spec.name, model, spec.config, spec.layout, spec.dtype, spec.max_model_len)


def pooled_worker_for(
    pools: dict[PoolKey, PooledWorker],
    ctx: SpawnContext,
    spec: ModelSpec,
    phase: Phase,
    kv: KVPool,
    env_of: Callable[[float, int], dict[str, str]],
    cores: int | None = None,
) -> PooledWorker:
    """The pooled worker of `spec`'s (phase, SM-share class) on `kv`'s device, made on first
        use. A class is what the process's environment fixes at its start (the MPS thread
        percentage on a GPU, the intra-op thread count on a CPU): models that need the same one
        share a process. `env_of(share, threads)` is that environment; `cores`: the CPU's (None:
    this process's)."""
    share = phase.share(spec.sm_share)
    on_cpu = kv.buffer.device.type == "cpu"
    threads = cpu_threads(share, cores) if on_cpu else 1
    env = env_of(share, threads)
    key = (phase, tuple(sorted(env.items())))
    if key not in pools:
        cls = f"t{threads}" if on_cpu else f"sm{round(share * 100)}"
        label = f"pool-{phase.value}-{cls}"
        init = PoolInit(label, phase, kv.buffer, kv.block_bytes, threads)
        pools[key] = PooledWorker(ctx, label, phase, init, env)
    return pools[key]
