"""Runs jobs in this process; on CUDA each (model, phase) has its own stream (green context)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch

from muxserve.executor.base import POLL_S, ModelSpec, load_progress
from muxserve.models.causal_lm import CausalLM
from muxserve.models.loader import load_model
from muxserve.runner.kv_pool import KVPool, PoolSizing
from muxserve.runner.model_runner import LaunchedJob, ModelRunner
from muxserve.runner.sm_partition import SMPartition, make_partitions
from muxserve.scheduler.job import Job, JobResult, Phase

POLL_SLEEP_S = 20e-6  # between checks of the jobs' CUDA events


class InlineExecutor:
    """Launches jobs on their (model, phase) stream as they are submitted; `poll` collects them.

    On CUDA the launched jobs overlap on the device, each within its green context's SMs where
    torch supports green contexts; on CPU `submit` runs each job to the end, one after another.
    """

    def __init__(
        self,
        runners: Mapping[str, ModelRunner],
        pool: KVPool,
        shares: Mapping[tuple[str, Phase], float] | None = None,
        specs: Mapping[str, ModelSpec] | None = None,
    ) -> None:
        """`specs`: where each model's checkpoint is, for a wake that reloads it (level 2)."""
        self.runners = dict(runners)
        self.specs = dict(specs or {})
        self.pool = pool
        device = self.device = pool.buffer.device
        self._partitions: dict[tuple[str, Phase], SMPartition] = {}
        if device.type == "cuda":  # one split of the SMs for all (model, phase) partitions
            wanted = {(n, p): (shares or {}).get((n, p), 1.0) for n in runners for p in Phase}
            self._partitions = make_partitions(device, wanted)
            for name, runner in self.runners.items():
                self._warm_up(name, runner)
        # launched jobs, each with the event recorded after it on its stream (CUDA only)
        self._launched: list[tuple[LaunchedJob, torch.cuda.Event | None]] = []

    @classmethod
    def create(
        cls,
        specs: Sequence[ModelSpec],
        sizing: PoolSizing,
        device: torch.device,
        progress: bool = False,
    ) -> InlineExecutor:
        """Load every model onto `device`, then allocate the pool in what the weights leave,
        and wrap each model in a runner."""
        models = {
            s.name: load_model(s.path, s.dtype, device, s.max_model_len)[0]
            for s in load_progress(specs, progress)
            if not s.asleep
        }
        pool = KVPool(sizing.num_blocks([device]), sizing.block_bytes, device)
        runners = {
            s.name: ModelRunner(
                s.name,
                models.get(s.name),
                s.config,
                pool,
                s.layout,
                s.dtype,
                s.max_model_len,
                0 if s.name in models else s.estimated_weight_bytes(),
            )
            for s in specs
        }
        shares = {(s.name, p): p.share(s.sm_share) for s in specs for p in Phase}
        return cls(runners, pool, shares, {s.name: s for s in specs})

    def submit(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            runner = self.runners[job.model]
            part = self._partitions.get((job.model, job.phase))
            if part is None:
                self._launched.append((runner.launch(job), None))
                continue
            part.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(part.stream):
                launched = runner.launch(job)
                done = torch.cuda.Event()
                done.record(part.stream)
            self._launched.append((launched, done))

    def poll(self, timeout: float = 0.0) -> list[tuple[Job, JobResult]]:
        """Collect the launched jobs that are done, waiting up to `timeout` s for the first.

        On CPU every launched job is done already. On CUDA a job is done when its stream
        passed the event recorded after it; results are read only then, since the copy to the
        host runs on another stream and would not wait for the job's.
        """
        if not self._launched:
            return []
        deadline = time.monotonic() + timeout
        while not (ready := [x for x in self._launched if x[1] is None or x[1].query()]):
            if time.monotonic() >= deadline:
                return []
            time.sleep(POLL_SLEEP_S)
        taken = {id(x) for x in ready}
        self._launched = [x for x in self._launched if id(x) not in taken]
        return [(lj.job, self.runners[lj.job.model].collect(lj)) for lj, _ in ready]

    def run(self, jobs: Sequence[Job]) -> list[tuple[Job, JobResult]]:
        """Submit and collect: the whole round at once."""
        self.submit(jobs)
        results: list[tuple[Job, JobResult]] = []
        while len(results) < len(jobs):
            results.extend(self.poll(POLL_S))
        return results

    def release(self, request_ids: Sequence[str]) -> None:
        """The runners forget what they keep of these requests (token histories)."""
        for runner in self.runners.values():
            runner.release(request_ids)

    def wake(self) -> None:
        """`poll` never waits on anything but the device."""

    def stop_idle(self) -> int:
        return 0  # no worker processes

    def degraded(self) -> dict[str, str]:
        return {}  # jobs run in this process: a stuck one stops the engine (no watchdog here)

    # ---- sleep and wake ---------------------------------------------------------------------
    can_sleep = True

    def weight_bytes(self, model: str) -> int:
        return self.runners[model].weights.nbytes

    def sleep_model(self, model: str, level: int) -> None:
        self.runners[model].sleep(level)

    def wake_model(self, model: str) -> None:
        """Host copy back to the device, or the checkpoint loaded again (memory-mapped)."""
        s = self.specs.get(model)
        runner = self.runners[model]

        def load() -> CausalLM:
            if s is None:
                raise RuntimeError(f"{model}: no checkpoint known to reload it from")
            if self.device.type != "cuda":
                return load_model(s.path, s.dtype, self.device, s.max_model_len)[0]
            # on a stream of its own: the legacy default stream would wait for every job
            stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(stream):
                loaded = load_model(s.path, s.dtype, self.device, s.max_model_len)[0]
            stream.synchronize()
            return loaded

        runner.wake(load)
        # its decode graphs now, in this (the waker's) thread, not one by one mid-serving as
        # its first decode steps need them: a capture there would stall the engine's loop
        self._warm_up(model, runner)

    def _warm_up(self, model: str, runner: ModelRunner) -> None:
        """Capture `model`'s start-up decode graphs, on the stream its decode jobs run on."""
        if runner.graphs is None:  # no graphs: off, or not CUDA
            return
        part = self._partitions.get((model, Phase.DECODE))
        if part is None:
            runner.graphs.warm_up()
            return
        with torch.cuda.stream(part.stream):
            runner.graphs.warm_up()

    # ---- models joining and leaving (ModelSetExecutor) ----------------------------------------
    def add_model(self, spec: ModelSpec) -> None:
        """A runner for `spec`, asleep: its first wake loads the checkpoint."""
        runner = ModelRunner(
            spec.name,
            None,
            spec.config,
            self.pool,
            spec.layout,
            spec.dtype,
            spec.max_model_len,
            spec.estimated_weight_bytes(),
        )
        if self.device.type == "cuda":  # a split of its own (untested on a GPU so far)
            shares = {(spec.name, p): p.share(spec.sm_share) for p in Phase}
            self._partitions = {**self._partitions, **make_partitions(self.device, shares)}
        # new dicts, not updates: the loop's thread may be iterating the old ones
        self.specs = {**self.specs, spec.name: spec}
        self.runners = {**self.runners, spec.name: runner}

    def remove_model(self, model: str) -> None:
        """Forget `model` (asleep, no job in flight) and its host copy, if any."""
        runner = self.runners[model]
        runner.sleep(2)  # drops a level-1 host copy; nothing to do for level 2
        self.runners = {n: r for n, r in self.runners.items() if n != model}
        self.specs = {n: s for n, s in self.specs.items() if n != model}
        for p in Phase:
            part = self._partitions.get((model, p))
            if part is not None:
                self._partitions = {k: v for k, v in self._partitions.items() if k != (model, p)}
                part.close()

    def shutdown(self) -> None:
        self._launched.clear()
        for part in self._partitions.values():
            part.close()
        self._partitions.clear()
