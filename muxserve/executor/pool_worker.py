"""A pooled worker process: runs the jobs of every model attached to it, in one phase.

Spawned by `PooledWorker` (worker_pool.py) with `engine.worker_pool: shared`. Its environment
(MPS thread percentage, thread count) is its SM-share class's, set before anything touches
CUDA; then it receives its `PoolInit` (the pool and the models to attach), says `WorkerReady`,
and serves `Attach` (answered with `Attached`), `Detach`, `Report` and `JobMessage`s in the
order they come until `Stop` or until the engine's end of the pipe closes. So one process (one
torch import, one CUDA context) serves any number of models, instead of two per model.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from muxserve.executor.messages import (
    Attach,
    Attached,
    Detach,
    JobMessage,
    PoolInit,
    Report,
    WorkerReport,
)
from muxserve.executor.mirror import RequestMirror
from muxserve.executor.worker import messages, run_job, run_process
from muxserve.runner.kv_pool import KVPool
from muxserve.runner.model_runner import ModelRunner
from muxserve.runner.model_weights import weight_bytes
from muxserve.scheduler.job import JobResult, Phase

log = logging.getLogger(__name__)


def pool_worker_main(conn: Connection, env: dict[str, str]) -> None:
    """Process entry point: start a pooled worker with its first models, serve until told to
    stop."""
    run_process(conn, env, PoolInit, PoolWorker)


@dataclass
class _Held:
    runner: ModelRunner
    mirror: RequestMirror
    nbytes: int  # its weights' bytes, for `WorkerReport`


class PoolWorker:
    """The runners of the models attached to this process, over its rank's shared pool."""

    def __init__(self, init: PoolInit) -> None:
        torch.set_num_threads(init.threads)
        self.label = init.label
        self.phase: Phase = init.phase
        device = init.pool.device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.pool = KVPool.from_buffer(init.pool, init.block_bytes)
        self.models: dict[str, _Held] = {}
        for a in init.attach:
            self.attach(a)

    def attach(self, a: Attach) -> None:
        runner = ModelRunner(
            a.name, a.model, a.config, self.pool, a.layout, a.dtype, a.max_model_len
        )
        if self.phase is Phase.DECODE and runner.graphs is not None:
            runner.graphs.warm_up()  # before its first job: not mid-serving another model's
        self.models[a.name] = _Held(
            runner, RequestMirror(a.name, self.phase), weight_bytes(a.model)
        )

    def detach(self, name: str) -> None:
        """Drop every reference to the model's weights (shared pages, or IPC mappings)."""
        self.models.pop(name, None)
        gc.collect()  # the runner's graphs and modules may sit in cycles
        if self.pool.buffer.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.ipc_collect()  # lets the engine free what it exported to us

    def close(self) -> None:
        """Let go of every model's weights before the process exits."""
        for name in list(self.models):
            self.detach(name)

    def report(self) -> WorkerReport:
        held = tuple(sorted((n, a.nbytes) for n, a in self.models.items()))
        return WorkerReport(os.getpid(), held)

    def serve(self, conn: Connection) -> int:
        """Serve messages until `Stop` or the engine goes away (0)."""
        for msg in messages(conn):
            if isinstance(msg, JobMessage):
                conn.send(self.run(msg))
            elif isinstance(msg, Attach):
                error = None
                try:
                    self.attach(msg)
                except Exception as e:  # its jobs fail with a clear error; the others run on
                    log.exception("%s: cannot attach %s", self.label, msg.name)
                    error = f"{type(e).__name__}: {e}"
                conn.send(Attached(msg.name, error))  # the waking thread waits for it
            elif isinstance(msg, Detach):
                self.detach(msg.name)
            elif isinstance(msg, Report):
                conn.send(self.report())
            else:
                raise TypeError(f"{self.label}: unexpected message {type(msg).__name__}")
        return 0

    def run(self, msg: JobMessage) -> JobResult:
        attached = self.models.get(msg.model)
        if attached is None:
            return JobResult(msg.job_id, (), f"{self.label}: model {msg.model!r} is not attached")
        return run_job(attached.runner, attached.mirror, msg)
