"""The multi-process executor: a worker process per (model, phase, TP rank), SM quotas by MPS.

With `engine.worker_pool: shared` the tp=1 models share pooled workers instead, one per
(phase, SM-share class) (worker_pool.py); the executor drives both kinds through one surface.

Each model's weights are loaded once, here, into shared memory (CPU) or GPU memory exported by
CUDA IPC, and mapped by its prefill and decode workers. Each TP rank index has its own KV pool
buffer (on GPU on the mesh's device of that rank), sized after the weights and mapped by every
worker of that rank; the scheduler's block ids hold one rank's KV heads, the same ids on each.
A job goes to its (model, phase) group as a delta message; results come back as the workers
finish, in any order. A worker that dies fails only its group's job and is
started again. On CUDA the executor runs its own MPS daemon and gives each worker
`CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` from its share; on CPU a share becomes a thread count.
A model's sleep, wake, addition and removal are its `MpsRoster`'s (mps_roster.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import torch
import torch.multiprocessing

from muxserve.errors import WorkerFailedError
from muxserve.executor.base import ModelSpec, load_progress
from muxserve.executor.hang_watch import START_TIMEOUT_S, HangWatch, Unit
from muxserve.executor.lifecycle import WorkerLifecycle
from muxserve.executor.messages import Attached, WorkerReport
from muxserve.executor.mps_daemon import (
    HINT,
    MpsDaemon,
    MpsUnavailableError,
    become_client,
    cuda_initialized,
)
from muxserve.executor.mps_roster import MpsRoster
from muxserve.executor.waker import Waker
from muxserve.executor.watchdog import JobDeadline
from muxserve.executor.worker_group import WorkerGroup
from muxserve.executor.worker_plans import env_of, rank_plans
from muxserve.executor.worker_pool import PooledWorker, PoolKey, attach_of, pooled_worker_for
from muxserve.executor.worker_unit import (
    STOP_TIMEOUT_S,
    GroupState,
    Waitable,
    WorkerDied,
    WorkerUnit,
    reap,
    wait_any,
    wait_ready,
)
from muxserve.models.causal_lm import CausalLM
from muxserve.models.sharding import load_rank_models, rank_device
from muxserve.runner.kv_pool import KVPool, PoolSizing
from muxserve.runner.model_weights import weight_bytes
from muxserve.scheduler.job import Job, JobResult, Phase

log = logging.getLogger(__name__)

IDLE_CHECK_S = 0.5  # how often groups are checked for idleness (lifecycle.idle_stop_s)
ATTACH_TIMEOUT_S = 120.0  # a wake waits this long for its pooled workers to build the model
MAX_FAILED_STARTS = 3  # restarts in a row that die before ready: the group gives up


class MpsExecutor:
    """Worker processes per (model, phase); `submit` hands out jobs, `poll` collects results."""

    def __init__(
        self,
        pools: list[KVPool],
        groups: dict[tuple[str, Phase], Unit],
        daemon: MpsDaemon | None,
        deadline: JobDeadline | None = None,
        lifecycle: WorkerLifecycle | None = None,
    ) -> None:
        # rank r's pool: on GPU on the mesh's r-th device; on CPU its own shared buffer, as
        # the same block id holds different KV heads on each rank
        self.pools = pools
        self.pool = pools[0]
        self.groups = groups
        self.daemon = daemon
        self._waker = Waker()
        # results for the next poll: jobs failed at submit, or read by a waking thread
        self._failed: list[tuple[Job, JobResult]] = []
        self._closed = False
        self.specs: list[ModelSpec] = []  # set by `create`, with what follows
        self.ctx: Any = None  # the spawn context its groups start processes with
        self.device = torch.device("cpu")
        # each model's shard per rank, with the rank's device; None: dropped (asleep, level 2)
        self.shards: dict[str, list[tuple[CausalLM, torch.device]] | None] = {}
        self.nbytes: dict[str, int] = {}  # each model's weights on one rank
        # held by `poll` and `stop_idle` (the loop's thread) and by a sleep or wake changing a
        # model's groups from another thread, so no pipe closes under a waiting poll
        self.groups_lock = threading.RLock()
        self._retiring: list[tuple[BaseProcess, float]] = []  # stopped workers still exiting
        self.watch = HangWatch(deadline, cpu_workers=self.pool.buffer.device.type == "cpu")
        self._next_idle_check = 0.0
        self.lifecycle = lifecycle or WorkerLifecycle()
        self.idle_stops = 0  # groups stopped for having been idle (lifecycle.idle_stop_s)
        self.attach_timeout = ATTACH_TIMEOUT_S
        self.acks = Waker()  # a poll read an `Attached`: a waking thread rechecks
        self.pooled: dict[PoolKey, PooledWorker] = {}  # shared mode: by (phase, class)
        self.roster = MpsRoster(self)  # its models' sleep, wake, add and remove

    @classmethod
    def create(
        cls,
        specs: Sequence[ModelSpec],
        sizing: PoolSizing,
        device: torch.device,
        progress: bool = False,
        start_timeout: float = START_TIMEOUT_S,
        deadline: JobDeadline | None = None,
        lifecycle: WorkerLifecycle | None = None,
    ) -> MpsExecutor:
        """Start MPS (on CUDA), load every model once, size and allocate one pool per rank
        index in what the weights leave, spawn the workers and wait until they are ready
        (lazy workers: none yet; each group starts at its first job)."""
        daemon = None
        if device.type == "cuda":
            if cuda_initialized():  # MPS attaches at CUDA's first initialisation, or never
                raise MpsUnavailableError(
                    "CUDA is initialised in this process already, so it cannot become a client "
                    "of the MPS daemon (clients attach when CUDA first initialises): create the "
                    "engine before anything touches CUDA (count GPUs with "
                    f"torch.cuda.device_count, not is_available), or {HINT}"
                )
            daemon = MpsDaemon.start()
            become_client(daemon)
        groups: dict[tuple[str, Phase], Unit] = {}
        pooled: dict[PoolKey, PooledWorker] = {}  # engine.worker_pool: shared
        pool_on = lifecycle is not None and lifecycle.pooled
        try:
            shards = {  # each model's shard per rank; on GPU rank r's is on the mesh's r-th
                spec.name: load_rank_models(
                    spec.path, spec.dtype, device, spec.tensor_parallel, spec.max_model_len
                )
                for spec in load_progress(specs, progress)
                if not spec.asleep  # asleep at level 2: loaded when it wakes
            }
            width = max((s.tensor_parallel for s in specs), default=1)
            devices = [rank_device(device, r) for r in range(width)]
            num_blocks = sizing.num_blocks(devices)
            pools = [KVPool(num_blocks, sizing.block_bytes, d, shared=True) for d in devices]
            ctx = torch.multiprocessing.get_context("spawn")
            for spec in specs:
                if pool_on and spec.tensor_parallel == 1:  # a TP model keeps its own groups
                    for phase in Phase:
                        unit = pooled_worker_for(pooled, ctx, spec, phase, pools[0], env_of(daemon))
                        groups[(spec.name, phase)] = unit
                        if not spec.asleep:
                            unit.attach(attach_of(spec, shards[spec.name][0][0]))
                    continue
                if spec.asleep:  # no workers until it wakes
                    for phase in Phase:
                        groups[(spec.name, phase)] = WorkerGroup(ctx, spec.name, phase, [])
                    continue
                ranks = [(model, pools[r]) for r, (model, _) in enumerate(shards[spec.name])]
                for phase in Phase:
                    plans = rank_plans(spec, phase, ranks, daemon)
                    groups[(spec.name, phase)] = WorkerGroup(ctx, spec.name, phase, plans)
            executor = cls(pools, groups, daemon, deadline, lifecycle)
            executor.watch.start_timeout = start_timeout
            executor.specs = list(specs)
            executor.ctx, executor.device = ctx, device
            executor.pooled = pooled
            executor.shards = {s.name: shards.get(s.name) for s in specs}
            executor.nbytes = {n: weight_bytes(r[0][0]) for n, r in shards.items()}
        except BaseException:
            if daemon is not None:
                daemon.stop()
            raise
        if executor.lifecycle.lazy:
            return executor
        try:
            executor._start_all(start_timeout)
        except BaseException:
            executor.shutdown()
            raise
        return executor

    def _units(self) -> list[Unit]:
        """Each group or pooled worker once (a pooled one runs several (model, phase)s)."""
        return list({id(u): u for u in self.groups.values()}.values())

    def _start_all(self, timeout: float) -> None:
        """Start every unit that can (an asleep model's groups have no ranks) and wait for
        them under one deadline; WorkerFailedError naming each that failed (the caller shuts
        the executor down)."""
        units = [u for u in self._units() if u.can_start]
        for unit in units:
            unit.start()
        failed = wait_ready(units, timeout)
        if failed:
            raise WorkerFailedError("; ".join(f"{u.label}: {d.reason}" for u, d in failed))

    @property
    def closed(self) -> bool:
        """`shutdown` ran: its workers are gone (read under `groups_lock` by a wake)."""
        return self._closed

    # ---- the executor interface ------------------------------------------------------------
    def submit(self, jobs: Sequence[Job]) -> None:
        if self._closed and jobs:
            raise WorkerFailedError("the executor was shut down: its workers are gone")
        if not jobs:
            return
        with self.groups_lock:  # a wake may be writing to a pooled worker's pipe
            self._submit(jobs)

    def _submit(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            # the scheduler says whose block tables are new (first admission or after a
            # preemption): every worker of the model must take them whole
            if job.fresh:
                for phase in Phase:
                    for mirror in self.groups[(job.model, phase)].mirrors_of(job.model):
                        mirror.invalidate(job.fresh)
            group = self.groups[(job.model, job.phase)]
            if group.broken is not None:
                self._failed.append((job, JobResult(job.job_id, (), group.broken)))
                continue
            if group.state is GroupState.STOPPED:  # lazy, or stopped while idle: start now
                log.info("%s: starting workers for a job", group.label)
                group.start()
            group.assign(job)

    def poll(self, timeout: float) -> list[tuple[Job, JobResult]]:
        with self.groups_lock:
            return self._poll(timeout)

    def _poll(self, timeout: float) -> list[tuple[Job, JobResult]]:
        results, self._failed = self._failed, []
        # built once: the units change only under the lock, which this poll holds throughout
        units = self._units()
        if results or not any(g.busy for g in units):
            return results
        deadline = time.monotonic() + timeout
        while True:
            results.extend(self._reap_hung(units))
            owners = self._owners(units)
            waker = self._waker.fileno()
            until = min(deadline, self.watch.next_check(units))
            ready = wait_any([*owners, waker], max(0.0, until - time.monotonic()))
            woken = False
            restarted: set[int] = set()  # groups replaced this round: their other events are old
            for obj in sorted(ready, key=lambda o: not isinstance(o, Connection)):  # pipes first
                if obj == waker:
                    self._waker.clear()
                    woken = True
                    continue
                group = owners[obj]
                if id(group) in restarted:
                    continue
                event = group.on_readable(obj)
                if isinstance(event, WorkerDied):
                    results.extend(self._restart(group, event))
                    restarted.add(id(group))
                elif isinstance(event, Attached):  # a wake waits for it; no need to wait on
                    self.acks.wake()
                    woken = True
                elif event is not None:
                    results.append(event)
            if results or woken or time.monotonic() >= deadline:
                return results

    def stop_idle(self) -> int:
        """Stop the workers of every group idle past `lifecycle.idle_stop_s` (they start again
        at the group's next job); how many groups stopped. The engine's loop calls it once an
        iteration; it looks at most every IDLE_CHECK_S."""
        if self.lifecycle.idle_stop_s is None or self._closed:
            return 0
        with self.groups_lock:
            return self._stop_idle()

    def _stop_idle(self) -> int:
        now, stopped = time.monotonic(), 0
        if now < self._next_idle_check:
            return 0
        self._next_idle_check = now + IDLE_CHECK_S
        self._reap_retired(now)
        for group in self._units():
            idle = group.state is GroupState.READY and group.job is None
            if idle and self.lifecycle.idle_expired(group.idle_since, now):
                idle_s = now - group.idle_since
                # not waited for here: the loop goes on serving while they exit
                exiting = group.retire()
                self.watch.forget(exiting)
                self._retiring.extend((p, now) for p in exiting)
                stopped += 1
                log.info("%s: workers stopped after %.0f s idle", group.label, idle_s)
        self.idle_stops += stopped
        return stopped

    def _reap_retired(self, now: float) -> None:
        """Release the stopped workers that have exited; kill those still there after
        STOP_TIMEOUT_S."""
        left = []
        for proc, since in self._retiring:
            if not proc.is_alive():
                proc.close()
            elif now - since >= STOP_TIMEOUT_S:
                proc.kill()
                left.append((proc, now - STOP_TIMEOUT_S))  # reaped at the next look
            else:
                left.append((proc, since))
        self._retiring = left

    def release(self, request_ids: Sequence[str]) -> None:
        for group in self._units():
            for mirror in group.all_mirrors():
                mirror.forget(request_ids)

    def wake(self) -> None:
        self._waker.wake()

    def shutdown(self) -> None:
        with self.groups_lock:  # a wake installs its groups under it, unless closed
            if self._closed:
                return
            self._closed = True
            units = self._units()
        for group in units:
            group.stop()
        reap([p for p, _ in self._retiring])
        self._retiring = []
        self._waker.close()
        self.acks.close()
        self.pools.clear()
        if self.daemon is not None:
            self.daemon.stop()

    # ---- internals -----------------------------------------------------------------------
    def _owners(self, units: list[Unit]) -> dict[Waitable, Unit]:
        return {obj: g for g in units for obj in g.waitables()}

    def _reap_hung(self, units: list[Unit]) -> list[tuple[Job, JobResult]]:
        """Kill and restart every unit the watch finds hung; hand their jobs back."""
        results = []
        for unit, died in self.watch.hung(units):
            results.extend(self._restart(unit, died))
        return results

    def _restart(self, group: Unit, died: WorkerDied) -> list[tuple[Job, JobResult]]:
        """Hand back the job the group was running, and start the group again (or give up).

        The job's requests are recomputed (`JobResult.retry`): they were lost with the worker,
        not refused. A job that never reached the workers is kept and goes to the new ones
        (a pooled worker's queued jobs of other models too; its models are attached again).
        """
        job = group.take_job() if group.delivered else None
        self.watch.forget(group.procs)
        group.kill()
        group.failed_starts = group.failed_starts + 1 if died.during_start else 0
        if job is None:
            error = f"{group.label}: {died.reason}; the worker restarts (no job was lost)"
        else:
            error = f"{group.label}: {died.reason}; its job is recomputed, the worker restarts"
        retry = True
        if group.failed_starts >= MAX_FAILED_STARTS:
            group.broken = f"{group.label}: workers failed to start {MAX_FAILED_STARTS} times"
            error = f"{group.label}: {died.reason}; {group.broken}, so the model stops serving"
            retry = False
        log.error("%s", error)
        if group.broken is None:
            group.start()
            group.start_reason = f"{group.label}: {died.reason}; restarting"
            return [] if job is None else [(job, JobResult(job.job_id, (), error, retry))]
        jobs = ([] if job is None else [job]) + group.take_all()
        return [(j, JobResult(j.job_id, (), error, retry)) for j in jobs]

    def degraded(self) -> dict[str, str]:
        """Models whose workers are restarting or broken, with why: for /health (it only
        reads, so any thread may call it)."""
        out: dict[str, str] = {}
        for (name, _), g in self.groups.items():
            if isinstance(g, PooledWorker) and name not in g.members:
                continue  # asleep: a pooled worker's trouble is not its own
            if g.broken is not None:
                out[name] = g.broken
            elif g.state is GroupState.STARTING and g.start_reason is not None:
                # a start on demand (lazy, or after an idle stop) is no failure: not degraded
                out.setdefault(name, g.start_reason)
        return out

    # ---- sleep and wake (docs/elastic.md) ---------------------------------------------------
    can_sleep = True

    def weight_bytes(self, model: str) -> int:
        known = self.nbytes.get(model)
        if known is not None:
            return known
        return next(s for s in self.specs if s.name == model).estimated_weight_bytes()

    def sleep_model(self, model: str, level: int) -> None:
        """Stop the model's workers (or detach it from its pooled ones) and move or drop its
        shards: `MpsRoster.sleep`."""
        self.roster.sleep(model, level)

    def wake_model(self, model: str) -> None:
        """Its shards back and its workers started or attached, waited for: `MpsRoster.wake`."""
        self.roster.wake(model)

    def add_model(self, spec: ModelSpec) -> None:
        """Take on `spec`'s model, asleep: `MpsRoster.add`."""
        self.roster.add(spec)

    def remove_model(self, model: str) -> None:
        """Forget an asleep `model` with no job in flight: `MpsRoster.remove`."""
        self.roster.remove(model)

    def drain(self, unit: WorkerUnit) -> None:
        """Handle what `unit`'s process has sent, under the lock while no poll runs: a
        result is kept for the next poll, a death restarts it (as a poll would)."""
        while unit.conns and unit.conns[0].poll(0):  # a closed pipe (death) reads as ready
            event = unit.on_readable(unit.conns[0])
            if isinstance(event, WorkerDied):
                self._failed.extend(self._restart(unit, event))
                return
            if isinstance(event, tuple):
                self._failed.append(event)

    def worker_pids(self) -> dict[tuple[str, Phase], list[int]]:
        """The live worker processes, by (model, phase): for tests and operators (a pooled
        worker's pid appears under every model attached to it)."""
        return {k: [p.pid for p in g.procs if p.pid is not None] for k, g in self.groups.items()}

    def worker_report(self) -> dict[str, WorkerReport]:
        """What each running, idle pooled worker holds (model names and weight bytes), asked
        of the processes themselves: for tests and operators, when no job runs."""
        self._waker.wake()
        with self.groups_lock:
            out = {}
            for unit in self._units():
                if isinstance(unit, PooledWorker) and (rep := unit.report()) is not None:
                    out[unit.label] = rep
            return out
