"""Runs jobs in this process; on CUDA each (model, phase) has its own stream."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from muxserve.runner.model_runner import LaunchedJob, ModelRunner
from muxserve.scheduler.job import Job, JobResult, Phase


class InlineExecutor:
    """Launches every job of a step on its (model, phase) stream, then collects them all.

    On CUDA the jobs overlap on the device; on CPU they run one after another.
    """

    def __init__(self, runners: Mapping[str, ModelRunner], device: torch.device) -> None:
        self.runners = dict(runners)
        self.device = device
        self._streams: dict[tuple[str, Phase], torch.cuda.Stream] = {}
        if device.type == "cuda":
            for name in runners:
                for phase in Phase:
                    self._streams[(name, phase)] = torch.cuda.Stream(device)

    def run(self, jobs: Sequence[Job]) -> list[tuple[Job, JobResult]]:
        launched: list[LaunchedJob] = []
        for job in jobs:
            runner = self.runners[job.model]
            stream = self._streams.get((job.model, job.phase))
            if stream is None:
                launched.append(runner.launch(job))
                continue
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                launched.append(runner.launch(job))
        return [(lj.job, self.runners[lj.job.model].collect(lj)) for lj in launched]

    def shutdown(self) -> None:
        self._streams.clear()
