"""Runs jobs in this process; on CUDA each (model, phase) has its own stream (green context)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from muxserve.executor.base import ModelSpec, load_progress
from muxserve.executor.sm_partition import SMPartition, make_partition
from muxserve.models.loader import load_model
from muxserve.runner.kv_pool import KVPool
from muxserve.runner.model_runner import LaunchedJob, ModelRunner
from muxserve.scheduler.job import Job, JobResult, Phase


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
    ) -> None:
        self.runners = dict(runners)
        self.pool = pool
        device = self.device = pool.buffer.device
        self._partitions: dict[tuple[str, Phase], SMPartition] = {}
        if device.type == "cuda":
            for name in runners:
                for phase in Phase:
                    share = (shares or {}).get((name, phase), 1.0)
                    self._partitions[(name, phase)] = make_partition(device, share)
        self._launched: list[LaunchedJob] = []

    @classmethod
    def create(
        cls, specs: Sequence[ModelSpec], pool: KVPool, progress: bool = False
    ) -> InlineExecutor:
        """Load every model onto the pool's device and wrap each in a runner."""
        device = pool.buffer.device
        runners = {}
        for spec in load_progress(specs, progress):
            model, _ = load_model(spec.path, spec.dtype, device)
            runners[spec.name] = ModelRunner(
                spec.name, model, spec.config, pool, spec.layout, spec.dtype
            )
        shares = {(s.name, p): s.share(p) for s in specs for p in Phase}
        return cls(runners, pool, shares)

    def submit(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            runner = self.runners[job.model]
            part = self._partitions.get((job.model, job.phase))
            if part is None:
                self._launched.append(runner.launch(job))
                continue
            part.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(part.stream):
                self._launched.append(runner.launch(job))

    def poll(self, timeout: float = 0.0) -> list[tuple[Job, JobResult]]:
        """Collect every launched job (waits for the device; `timeout` does not apply)."""
        launched, self._launched = self._launched, []
        return [(lj.job, self.runners[lj.job.model].collect(lj)) for lj in launched]

    def run(self, jobs: Sequence[Job]) -> list[tuple[Job, JobResult]]:
        """Submit and collect: the whole round at once."""
        self.submit(jobs)
        return self.poll()

    def release(self, request_ids: Sequence[str]) -> None:
        """Nothing is kept per request in this process."""

    def wake(self) -> None:
        """`poll` never waits on anything but the device."""

    def shutdown(self) -> None:
        self._launched.clear()
        self._partitions.clear()
