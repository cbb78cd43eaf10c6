"""The engine's handle on the worker processes of one (model, phase): one per TP rank.

It starts them, feeds them jobs (encoded per rank by its `WorkerMirror`), turns their answers
and their deaths into events, and restarts them. All ranks of a group live and die together:
a tensor-parallel job needs every rank, so a rank that dies takes its group's job with it.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, replace
from multiprocessing.context import SpawnContext

from muxserve.executor.messages import WorkerInit
from muxserve.executor.mirror import WorkerMirror
from muxserve.executor.worker import worker_main
from muxserve.executor.worker_unit import GroupState, WorkerUnit
from muxserve.scheduler.job import Job, Phase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankPlan:
    """How to start one rank's worker: its init message (model shard, its rank's pool) and
    environment."""

    init: WorkerInit
    env: dict[str, str]


class WorkerGroup(WorkerUnit):
    """The processes of one (model, phase), one per tensor-parallel rank, run as one."""

    def __init__(self, ctx: SpawnContext, name: str, phase: Phase, ranks: list[RankPlan]) -> None:
        super().__init__(ctx, name, phase)
        self.ranks = ranks
        self.mirrors = [WorkerMirror() for _ in ranks]

    @property
    def label(self) -> str:
        return f"{self.name}/{self.phase.value}"

    @property
    def width(self) -> int:
        return len(self.ranks)

    @property
    def can_start(self) -> bool:
        """It has ranks to start (an asleep model's groups have none)."""
        return bool(self.ranks)

    def mirrors_of(self, model: str) -> list[WorkerMirror]:
        """The mirrors of `model`'s requests: one per rank (the group serves only it)."""
        return self.mirrors

    def all_mirrors(self) -> list[WorkerMirror]:
        return self.mirrors

    def _job_mirrors(self, job: Job) -> list[WorkerMirror]:
        return self.mirrors

    def _on_ready(self) -> None:
        log.info("%s: %d worker(s) ready", self.label, len(self.ranks))

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Spawn every rank and send its init; answers come through `on_readable`."""
        self._check_stopped()
        port = _free_port() if len(self.ranks) > 1 else 0
        for rank, plan in enumerate(self.ranks):
            init = plan.init
            if init.tp is not None:
                init = replace(init, tp=replace(init.tp, init_method=f"tcp://127.0.0.1:{port}"))
            name = f"muxserve-{self.name}-{self.phase.value}-{rank}"
            self._spawn(worker_main, plan.env, init, name)
        self._starting()

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

    def take_job(self) -> Job | None:
        """Take back the group's job (finished, or never to finish: its workers are gone)."""
        job, self.job = self.job, None
        return job


def _free_port() -> int:
    """A TCP port free right now on the loopback, for a group's torch.distributed rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
