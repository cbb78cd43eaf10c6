"""Which models an mps executor's workers serve, changed while it serves: sleep, wake, add,
remove (docs/elastic.md, muxserve/roster.py).

A sleep stops a model's own worker groups, or detaches it from its pooled workers; a wake
builds its groups again (eager workers: started and waited for here, so the wake's time
includes the start) or attaches it to its pooled workers and waits for them to build it. These
run on another thread than the engine's loop: they change the executor's groups under its
`groups_lock`, between two polls, and wait for processes outside it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

from muxserve.errors import WorkerFailedError
from muxserve.executor.base import ModelSpec
from muxserve.executor.hang_watch import Unit
from muxserve.executor.worker_group import WorkerGroup
from muxserve.executor.worker_plans import env_of, rank_plans
from muxserve.executor.worker_pool import PooledWorker, attach_of, pooled_worker_for
from muxserve.executor.worker_unit import GroupState, reap, wait_any, wait_ready
from muxserve.models.sharding import load_rank_models
from muxserve.runner.model_weights import ModelWeights, weight_bytes
from muxserve.scheduler.job import Phase

if TYPE_CHECKING:
    from muxserve.executor.mps import MpsExecutor

log = logging.getLogger(__name__)


class MpsRoster:
    """The sleep, wake, add and remove of one executor's models (it owns one)."""

    def __init__(self, executor: MpsExecutor) -> None:
        self.ex = executor

    def sleep(self, model: str, level: int) -> None:
        """Stop the model's workers, or detach it from its pooled ones (between two polls of
        the loop), then move the engine's copy of its shards, which the workers mapped, to
        host memory (level 1; on a CPU they are there already, in shared memory) or drop it
        (level 2)."""
        ex = self.ex
        spec = next(s for s in ex.specs if s.name == model)
        ex.wake()  # a waiting poll returns and lets go of the groups
        exiting: list[BaseProcess] = []
        with ex.groups_lock:
            for phase in Phase:
                unit = ex.groups[(model, phase)]
                if isinstance(unit, PooledWorker):
                    unit.detach(model)  # the process stays up for the others
                else:
                    exiting += unit.retire()
        reap(exiting)  # outside the lock: the loop serves the other models meanwhile
        with ex.groups_lock:
            shards = ex.shards.get(model)
            if level == 1 and shards is not None:
                for shard, _ in shards:
                    ModelWeights(shard).to_host(shard, spec.max_model_len)
                return
            ex.shards[model] = None  # the groups' inits hold the shards too: new, empty ones
            for phase in Phase:
                if isinstance(ex.groups[(model, phase)], WorkerGroup):
                    ex.groups[(model, phase)] = WorkerGroup(ex.ctx, model, phase, [])

    def wake(self, model: str) -> None:
        """The shards back on their devices (or loaded again), then attached to the model's
        pooled workers (running: nothing starts), or its own groups rebuilt and, with eager
        workers, started and waited for under one deadline (`watch.start_timeout`): a wake's
        time includes the start it needs, not the model's first job. Lazy workers start at
        its first job."""
        ex = self.ex
        spec = next(s for s in ex.specs if s.name == model)
        shards = ex.shards.get(model)
        if shards is None:
            shards = load_rank_models(
                spec.path, spec.dtype, ex.device, spec.tensor_parallel, spec.max_model_len
            )
        else:
            for shard, device in shards:
                ModelWeights(shard).to_device(shard, device, spec.max_model_len)
        ranks = [(m, ex.pools[r]) for r, (m, _) in enumerate(shards)]
        fresh: dict[Phase, WorkerGroup] = {}
        pooled: list[PooledWorker] = []
        with ex.groups_lock:
            ex.shards[model] = shards
            ex.nbytes[model] = weight_bytes(shards[0][0])
            for phase in Phase:
                unit = ex.groups[(model, phase)]
                if isinstance(unit, PooledWorker):
                    unit.attach(attach_of(spec, shards[0][0]))
                    if unit.state is GroupState.STOPPED and not ex.lifecycle.lazy:
                        unit.start()  # its class has no running worker: its init attaches it
                    pooled.append(unit)
                else:
                    plans = rank_plans(spec, phase, ranks, ex.daemon)
                    fresh[phase] = WorkerGroup(ex.ctx, model, phase, plans)
        if fresh and not ex.lifecycle.lazy:
            # started here, before the loop's poll knows them, so only this thread reads them;
            # all at once, and waited for under one deadline: their starts overlap
            try:
                for group in fresh.values():
                    group.start()
                failed = wait_ready(list(fresh.values()), ex.watch.start_timeout)
            except BaseException:  # a start that raised, an unexpected message, ^C: nobody
                for group in fresh.values():  # else knows these processes, so none may stay
                    group.kill()
                raise
            for group, died in failed:
                # its first job starts it again (and counts failures)
                log.warning(
                    "%s: %s while waking; starting at its first job", group.label, died.reason
                )
                group.kill()
        with ex.groups_lock:
            closed = ex.closed  # shut down meanwhile: `shutdown` could not see these
            if not closed:
                for phase, group in fresh.items():
                    ex.groups[(model, phase)] = group
        if closed:
            for group in fresh.values():
                group.kill()
            raise WorkerFailedError(f"{model}: the executor was shut down while it woke")
        if pooled:
            self._await_attached(pooled, model)

    def _await_attached(self, units: list[PooledWorker], model: str) -> None:
        """Wait (up to the executor's `attach_timeout`) until each pooled worker has built
        `model` (its `Attached`, or the `WorkerReady` of a worker started with it), so the
        wake's time includes the build and the model's first job does not pay it.

        The pipes are read here, under the lock, between two polls (the loop polls only while
        jobs run); the wait itself is outside the lock, so the loop runs the other workers'
        jobs meanwhile, and this worker's queued ones wait only for the build itself.
        Raises WorkerFailedError, the model put back to sleep, if a worker cannot build it.
        """
        ex = self.ex
        deadline = time.monotonic() + ex.attach_timeout
        while True:
            with ex.groups_lock:
                ex.acks.clear()  # before looking: an ack read later wakes the wait below
                for unit in units:
                    ex.drain(unit)
                waiting = [u for u in units if u.attaching(model)]
                objs = [o for u in waiting for o in u.waitables()]
            if not waiting:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                names = ", ".join(u.label for u in waiting)
                log.warning("%s: not attached after %.0f s by %s", model, ex.attach_timeout, names)
                return
            wait_any([*objs, ex.acks.fileno()], left)
        failed = [f"{u.label}: {u.attach_errors[model]}" for u in units if model in u.attach_errors]
        if failed:  # the wake fails, undone: the model is asleep again, as before it
            self.sleep(model, 1)
            raise WorkerFailedError(f"{model}: its workers could not build it: {'; '.join(failed)}")

    # ---- a model added or removed while serving (muxserve/roster.py) -------------------------
    def add(self, spec: ModelSpec) -> None:
        """Take on `spec`'s model, asleep: with pooled workers it joins its share class's (made
        if its class has none; started at its wake), otherwise it gets groups with no workers
        (built at its wake). Nothing is loaded until it wakes. Tensor-parallel models are
        refused: their ranks would need pools this engine may not have."""
        if spec.tensor_parallel > 1:
            raise ValueError(
                f"{spec.name}: tensor_parallel={spec.tensor_parallel} cannot be added to a "
                "running mps engine (only tensor_parallel: 1); list it in the engine's config"
            )
        ex = self.ex
        spec = replace(spec, asleep=True)
        with ex.groups_lock:
            new: dict[tuple[str, Phase], Unit] = {}
            for phase in Phase:
                if ex.lifecycle.pooled:
                    env = env_of(ex.daemon)
                    kv = ex.pools[0]
                    new[(spec.name, phase)] = pooled_worker_for(
                        ex.pooled, ex.ctx, spec, phase, kv, env
                    )
                else:
                    new[(spec.name, phase)] = WorkerGroup(ex.ctx, spec.name, phase, [])
            # new containers, not updates: `degraded` and `worker_pids` read without the lock
            ex.groups = {**ex.groups, **new}
            ex.specs = [*ex.specs, spec]
            ex.shards = {**ex.shards, spec.name: None}

    def remove(self, model: str) -> None:
        """Forget an asleep `model` with no job in flight: its groups (no workers while
        asleep), its place in its pooled workers (a worker no model uses any more stops), and
        its shards' host copy."""
        ex = self.ex
        exiting: list[BaseProcess] = []
        with ex.groups_lock:
            units = [ex.groups[(model, phase)] for phase in Phase]
            ex.groups = {k: u for k, u in ex.groups.items() if k[0] != model}
            used = {id(u) for u in ex.groups.values()}
            for unit in units:
                if isinstance(unit, PooledWorker):
                    unit.detach(model)
                if id(unit) not in used:  # a pooled worker of its class alone, or its groups
                    exiting += unit.retire()
                    ex.pooled = {k: p for k, p in ex.pooled.items() if p is not unit}
            ex.specs = [s for s in ex.specs if s.name != model]
            ex.shards = {n: s for n, s in ex.shards.items() if n != model}
            ex.nbytes = {n: b for n, b in ex.nbytes.items() if n != model}
        reap(exiting)
