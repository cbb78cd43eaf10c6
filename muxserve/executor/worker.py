"""A worker process: runs the jobs of one (model, phase, tensor-parallel rank).

Spawned by `WorkerGroup`. Its environment (MPS pipe directory, thread percentage) is set
before anything touches CUDA; then it receives its `WorkerInit` (weights and pool as shared
handles), says `WorkerReady`, and runs `JobMessage`s until `Stop` or until the engine's end of
the pipe closes. Rank 0 answers each job with its `JobResult`; other ranks only compute.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Protocol, TypeVar

import torch

from muxserve.executor.messages import (
    JobMessage,
    Stop,
    TPRank,
    WorkerInit,
    WorkerReady,
    WorkerStartFailed,
)
from muxserve.executor.mirror import RequestMirror
from muxserve.runner.kv_pool import KVPool
from muxserve.runner.model_runner import ModelRunner
from muxserve.scheduler.job import JobResult, Phase

log = logging.getLogger(__name__)

I = TypeVar("I")  # a process's init message

TP_TIMEOUT = timedelta(seconds=60)  # a collective waiting longer than this: a peer is gone


class Serving(Protocol):
    """What a worker process runs once started: its message loop, then its cleanup."""

    def serve(self, conn: Connection) -> int: ...
    def close(self) -> None: ...


def run_process(
    conn: Connection, env: dict[str, str], init_type: type[I], make: Callable[[I], Serving]
) -> None:
    """A worker process's life: set the environment, receive its `init_type` init, build the
    worker with `make` (a failure is sent back as `WorkerStartFailed`), say `WorkerReady`,
    serve until told to stop, clean up."""
    os.environ.update(env)  # before CUDA initialises: MPS reads it once, at context creation
    try:
        init = conn.recv()
        if not isinstance(init, init_type):
            raise TypeError(f"expected {init_type.__name__}, got {type(init).__name__}")
        worker = make(init)
    except Exception as e:
        conn.send(WorkerStartFailed(f"{type(e).__name__}: {e}"))
        return
    conn.send(WorkerReady(os.getpid()))
    code = worker.serve(conn)
    worker.close()
    sys.exit(code)


def messages(conn: Connection) -> Iterator[object]:
    """The engine's messages to a worker, until `Stop` or until the engine closes its end."""
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the engine closed its end: nothing more will come
        if isinstance(msg, Stop):
            return
        yield msg


def run_job(runner: ModelRunner, mirror: RequestMirror, msg: JobMessage) -> JobResult:
    """Apply a job's delta to the model's mirror, free what finished, run the job. A delta the
    mirror cannot apply (a protocol bug) fails this job, not the worker."""
    try:
        job = mirror.apply(msg)
    except Exception as e:
        log.exception("job %d: cannot apply the message", msg.job_id)
        return JobResult(msg.job_id, (), f"worker mirror out of sync: {type(e).__name__}: {e}")
    runner.release(msg.finished)
    return runner.execute(job)


def worker_main(conn: Connection, env: dict[str, str]) -> None:
    """Process entry point: start the worker of one (model, phase, rank), serve until told to
    stop."""
    run_process(conn, env, WorkerInit, Worker)


class Worker:
    """One model's runner over the shared pool, with the mirror of its requests."""

    def __init__(self, init: WorkerInit) -> None:
        torch.set_num_threads(init.threads)
        self.tp = init.tp
        device = init.pool.device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if init.tp is not None:
            _join_group(init.tp, device)
        pool = KVPool.from_buffer(init.pool, init.block_bytes)
        self.runner = ModelRunner(
            init.name, init.model, init.config, pool, init.layout, init.dtype, init.max_model_len
        )
        if init.phase is Phase.DECODE and self.runner.graphs is not None:
            # before WorkerReady: a capture mid-serving would stall the device for every model
            self.runner.graphs.warm_up()
        self.mirror = RequestMirror(init.name, init.phase)

    def serve(self, conn: Connection) -> int:
        """Run jobs until `Stop` (0) or the engine goes away (0); 1 if a TP rank fails a job."""
        for msg in messages(conn):
            if not isinstance(msg, JobMessage):
                raise TypeError(f"expected JobMessage, got {type(msg).__name__}")
            result = self.run(msg)
            if self.tp is None or self.tp.rank == 0:
                conn.send(result)
            if result.error is not None and self.tp is not None:
                # the ranks may now disagree on which collective comes next: restart the group
                return 1
        return 0

    def run(self, msg: JobMessage) -> JobResult:
        return run_job(self.runner, self.mirror, msg)

    def close(self) -> None:
        if self.tp is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _join_group(tp: TPRank, device: torch.device) -> None:
    """Join this (model, phase)'s tensor-parallel group: the process's default group."""
    import torch.distributed as dist

    dist.init_process_group(
        tp.backend,
        init_method=tp.init_method,
        rank=tp.rank,
        world_size=tp.world_size,
        timeout=TP_TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )
