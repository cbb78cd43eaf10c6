"""The engine's handle on one pooled worker process: several models' jobs in one phase.

With `engine.worker_pool: shared` each mesh rank has one worker per (phase, SM-share class)
instead of one per (model, phase): models attach to it (`Attach`, on start and on wake) and
detach from it on sleep. It keeps the scheduler's view: a (model, phase) still has one job at
a time; jobs of different models wait here, in arrival order, and go to the process one at a
time, so the watchdog's clock (`sent_at`) is the running job's. Like a `WorkerGroup` it is a
`WorkerUnit` (worker_unit.py): the executor drives both alike.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess

from muxserve.executor.base import ModelSpec, cpu_threads
from muxserve.executor.messages import (
    Attach,
    Attached,
    Detach,
    PoolInit,
    Report,
    WorkerReport,
)
from muxserve.executor.mirror import WorkerMirror
from muxserve.executor.pool_worker import pool_worker_main
from muxserve.executor.worker_unit import GroupState, WorkerUnit
from muxserve.models.causal_lm import CausalLM
from muxserve.runner.kv_pool import KVPool
from muxserve.scheduler.job import Job, Phase

log = logging.getLogger(__name__)

REPORT_TIMEOUT_S = 30.0  # a pooled worker answers a `Report` within this
PoolKey = tuple[Phase, tuple[tuple[str, str], ...]]  # (phase, its class's environment)


class PooledWorker(WorkerUnit):
    """One worker process of a (phase, SM-share class) and the models attached to it."""

    def __init__(
        self,
        ctx: SpawnContext,
        label: str,
        phase: Phase,
        pool: PoolInit,
        env: dict[str, str],
    ) -> None:
        super().__init__(ctx, label, phase)
        self._init = pool  # its `attach` is set from `members` at each start
        self.env = env
        self.members: dict[str, Attach] = {}  # attached models (awake), re-attached on restart
        self.mirrors: dict[str, WorkerMirror] = {}  # per model: what the process holds of it
        self._pending: list[Attach | Detach] = []  # made while it starts or runs a job
        # attached models the process has not acknowledged yet (`Attached`, or its `WorkerReady`
        # after an init that carried them): a wake waits for them (the model's build)
        self._unacked: set[str] = set()
        self.attach_errors: dict[str, str] = {}  # models the process could not attach, why
        self._queue: deque[Job] = deque()  # other models' jobs waiting for this process

    @property
    def can_start(self) -> bool:
        """Always: a pool runs whether or not a model is attached (a wake only attaches)."""
        return True

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

    def _job_mirrors(self, job: Job) -> list[WorkerMirror]:
        mirror = self.mirrors.get(job.model)
        if mirror is None:
            raise RuntimeError(f"{self.label}: job {job.job_id} of unattached {job.model}")
        return [mirror]

    def _on_ready(self) -> None:
        # its init's models are built; those attached since go out now and answer
        self._unacked &= {c.name for c in self._pending if isinstance(c, Attach)}
        log.info("%s: ready with %d model(s)", self.label, len(self.members))

    def _free(self) -> None:
        self._flush()  # what waited for the process first: a job may need its attach
        super()._free()

    def _other_message(self, msg: object) -> Attached | None:
        if isinstance(msg, Attached):
            self._acked(msg)
            return msg
        return super()._other_message(msg)

    def _describe(self, proc: BaseProcess) -> str:
        served = ", ".join(sorted(self.members)) or "no model"
        return f"pooled worker {proc.name} (pid {proc.pid}, serving {served})"

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Spawn the process and send its init with every member attached."""
        self._check_stopped()
        init = replace(self._init, attach=tuple(self.members.values()))
        self._spawn(pool_worker_main, self.env, init, f"muxserve-{self.name}")
        self._pending = []
        self._unacked = set(self.members)  # its `WorkerReady` says they are built
        self._starting()

    def _reset(self) -> None:
        """Members and queued jobs stay (attached, and sent, after the next start); what was on
        its way to the process is gone with it."""
        super()._reset()
        self._pending = []
        self._unacked = set()

    # ---- jobs ----------------------------------------------------------------------------
    def assign(self, job: Job) -> None:
        """Queue a job behind the other models'; it goes out when the process is free."""
        if self.job is None:
            self.job, self._sent = job, False
            if self.state is GroupState.READY:
                self._dispatch()
        else:
            self._queue.append(job)

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
