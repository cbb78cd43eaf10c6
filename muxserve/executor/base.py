"""The executor seam: what an engine hands an executor, and what it gets back.

An executor runs jobs somewhere (this process, or worker processes) and returns their results
as they finish, so the engine can start a new job for a (model, phase) as soon as its previous
one is done, while the jobs of other models still run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from muxserve.config import SMShare
from muxserve.dtypes import torch_dtype
from muxserve.executor.lifecycle import WorkerLifecycle
from muxserve.executor.watchdog import JobDeadline
from muxserve.kv.layout import KVLayout
from muxserve.model_descriptor import ModelDescriptor
from muxserve.models.hf_config import HFModelConfig
from muxserve.runner.kv_pool import KVPool, PoolSizing
from muxserve.scheduler.job import Job, JobResult

POLL_S = 1.0  # longest one `poll` of the engine's loop waits for a result before it returns


@dataclass(frozen=True)
class ModelSpec:
    """A model as an executor needs it: where its weights are, how it views the pool, its SMs."""

    name: str
    path: Path
    config: HFModelConfig
    layout: KVLayout  # one rank's view of a pool block: its KV heads (all of them at tp 1)
    dtype: torch.dtype
    sm_share: SMShare
    tensor_parallel: int = 1
    max_model_len: int | None = None  # the served context: per-position buffers' length
    asleep: bool = False  # listed but not loaded until it is woken (initial_state: asleep)

    @classmethod
    def of(cls, model: ModelDescriptor, path: str | Path) -> ModelSpec:
        """The executor's view of a described model whose checkpoint is at `path`."""
        return cls(
            model.name,
            Path(path),
            model.config,
            model.layout,
            torch_dtype(model.dtype),
            model.sm_share,
            model.tensor_parallel,
            model.max_model_len,
        )

    def estimated_weight_bytes(self) -> int:
        """What its weights take on one device, from the checkpoint's shapes and the dtype."""
        from muxserve.models.registry import checkpoint_shapes

        itemsize = torch.empty((), dtype=self.dtype).element_size()
        numel = sum(math.prod(s) for s in checkpoint_shapes(self.config).values())
        return numel * itemsize // self.tensor_parallel


class Executor(Protocol):
    """Runs jobs and hands back their results as they finish.

    One job per (model, phase) is in flight at a time (the scheduler sees to that). `submit`
    never waits for a job; `poll` waits for results. Only the engine's loop thread calls
    `submit`, `poll` and `release`; `wake` may be called from any thread.
    """

    pool: KVPool  # the KV pool's memory on the device, allocated by the executor
    can_sleep: bool  # whether `sleep_model` / `wake_model` work (both executors: yes)

    def submit(self, jobs: Sequence[Job]) -> None:
        """Start the jobs (or queue them for a worker that is still starting)."""
        ...

    def poll(self, timeout: float) -> list[tuple[Job, JobResult]]:
        """Results of jobs that finished, waiting up to `timeout` s for the first.

        Returns at once with [] when no job is in flight, and early with [] after `wake()`.
        A job whose worker died comes back with `JobResult.error` set.
        """
        ...

    def release(self, request_ids: Sequence[str]) -> None:
        """These requests finished: workers may forget what they keep of them."""
        ...

    def wake(self) -> None:
        """Make a `poll` waiting in another thread return now (new work may be schedulable)."""
        ...

    def shutdown(self) -> None:
        """Stop every worker and free what the executor holds; idempotent."""
        ...

    def degraded(self) -> dict[str, str]:
        """Models that cannot run jobs right now (workers restarting or broken), with why."""
        ...

    def weight_bytes(self, model: str) -> int:
        """What `model`'s weights take on each of its devices while it is awake."""
        ...

    def sleep_model(self, model: str, level: int) -> None:
        """Take `model`'s weights off the device (level 1: to host memory; 2: dropped).

        The engine calls it with no job of the model in flight, from any thread but the loop's.
        """
        ...

    def wake_model(self, model: str) -> None:
        """Put a sleeping model's weights back on the device (from host memory, or its
        checkpoint); from any thread but the loop's, while the loop runs other models' jobs."""
        ...

    def stop_idle(self) -> int:
        """Stop worker processes idle past their limit, if the executor has any; how many
        groups stopped. The loop's thread calls it while the engine waits for work."""
        ...


@runtime_checkable
class ModelSetExecutor(Protocol):
    """An executor whose models may change while it serves (a mesh that changes shape)."""

    def add_model(self, spec: ModelSpec) -> None:
        """Take on a model, asleep (nothing loaded): its wake loads it."""
        ...

    def remove_model(self, model: str) -> None:
        """Forget an asleep model with no job in flight, and what it holds."""
        ...


def cpu_threads(share: float, cores: int | None = None) -> int:
    """The CPU analogue of an SM share: intra-op threads for a worker with that share."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, round(share * (cores or 1)))


def create_executor(
    kind: str,
    specs: Sequence[ModelSpec],
    sizing: PoolSizing,
    device: torch.device,
    progress: bool = False,
    deadline: JobDeadline | None = None,
    lifecycle: WorkerLifecycle | None = None,
) -> Executor:
    """The executor `EngineConfig.executor` names, with every model loaded and its KV pool.

    The executor allocates the pool because where it lives depends on the executor: worker
    processes map it from shared memory (CPU) or by CUDA IPC, and on CUDA the MPS daemon must
    run before this process first touches the GPU. It sizes the pool after loading the
    weights (`sizing`), so a pool sized from the device's memory leaves them room; the
    engine reads the block count from `executor.pool.num_blocks`.
    """
    if kind == "inline":
        from muxserve.executor.inline import InlineExecutor

        if any(s.tensor_parallel > 1 for s in specs):
            bad = next(s for s in specs if s.tensor_parallel > 1)
            raise ValueError(
                f"{bad.name}: tensor_parallel={bad.tensor_parallel} needs worker processes; "
                "set engine.executor: mps"
            )
        return InlineExecutor.create(specs, sizing, device, progress)
    if kind == "mps":
        from muxserve.executor.mps import MpsExecutor

        return MpsExecutor.create(
            specs, sizing, device, progress, deadline=deadline, lifecycle=lifecycle
        )
    raise ValueError(f"unknown executor {kind!r}; use 'inline' or 'mps'")


def load_progress(specs: Sequence[ModelSpec], show: bool) -> Iterable[ModelSpec]:
    """`specs`, with a progress bar that advances as each model loads when `show`."""
    if not show:
        return specs
    from tqdm import tqdm

    return tqdm(specs, desc="loading models", unit="model")
