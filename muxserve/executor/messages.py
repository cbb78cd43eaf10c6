"""The typed messages between the engine process and its worker processes.

Per job, a worker gets only what changed since its last job: requests it has not seen (with
their sampling parameters and block table, once), block ids appended to the tables it mirrors,
the tokens and positions of this step, and the requests it may forget. It answers with the
`JobResult` the scheduler consumes. Tensors (weights, the pool) travel once, in `WorkerInit`,
as shared-memory or CUDA IPC handles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from muxserve.kv.layout import KVLayout
from muxserve.models.causal_lm import CausalLM
from muxserve.models.hf_config import HFModelConfig
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import Phase


@dataclass(frozen=True)
class TPRank:
    """A worker's place in its (model, phase) tensor-parallel group."""

    rank: int
    world_size: int
    init_method: str  # torch.distributed rendezvous, e.g. "tcp://127.0.0.1:29500"
    backend: str  # "gloo" on CPU, "nccl" on GPU


@dataclass
class WorkerInit:
    """A worker's first message: its model (weights shared, not copied) and the pool."""

    name: str
    phase: Phase
    model: CausalLM  # parameters in shared memory (CPU) or CUDA IPC handles
    config: HFModelConfig
    pool: torch.Tensor  # the KV pool's byte buffer, shared with every worker on the device
    block_bytes: int
    layout: KVLayout
    dtype: torch.dtype
    threads: int  # intra-op threads: the CPU analogue of the SM share
    tp: TPRank | None = None
    max_model_len: int | None = None  # the served context (None: max_position_embeddings)


@dataclass(frozen=True)
class WorkerReady:
    """The worker mapped its model and pool and waits for jobs."""

    pid: int


@dataclass(frozen=True)
class WorkerStartFailed:
    """The worker could not start; it exits after sending this."""

    error: str


@dataclass(slots=True)
class NewSeq:
    """A request the worker has not seen (or must forget what it had: it was preempted)."""

    request_id: str
    params: SamplingParams
    seed: int
    block_table: np.ndarray  # (logical blocks, layers, this rank's kv heads) int32


@dataclass(slots=True)
class SeqStep:
    """One sequence's share of a job, relative to what the worker mirrors of it."""

    request_id: str
    token_ids: tuple[int, ...]
    start_pos: int
    sample: bool
    step: int  # index of the output token being sampled
    new_blocks: np.ndarray | None  # logical blocks appended to its table since the last job
    # what SeqWork carries for the requests that use it (see SeqWork): passed on as it is
    history: tuple[int, ...] | None = None
    banned: frozenset[int] = frozenset()
    allowed: np.ndarray | None = None
    prompt_len: int = 0
    next_token: int | None = None


@dataclass(slots=True)
class JobMessage:
    """A job for one worker: new requests first, then the step of each sequence in order."""

    job_id: int
    sm_share: float
    new: tuple[NewSeq, ...]
    steps: tuple[SeqStep, ...]
    finished: tuple[str, ...]  # requests the worker may forget
    model: str = ""  # whose job: a pooled worker runs several models' (worker_pool.py)


@dataclass(frozen=True)
class Stop:
    """Exit after the current job."""


# ---- a pooled worker's messages (pool_worker.py): several models in one process ----------


@dataclass
class Attach:
    """Map one model into a pooled worker (its weights shared, not copied), to run its jobs."""

    name: str
    model: CausalLM  # parameters in shared memory (CPU) or CUDA IPC handles
    config: HFModelConfig
    layout: KVLayout
    dtype: torch.dtype
    max_model_len: int | None = None


@dataclass(frozen=True)
class Attached:
    """A pooled worker's answer to `Attach`: the model is ready to run (error: why not), so a
    wake's time includes the model's build and its first job does not pay it."""

    name: str
    error: str | None = None


@dataclass(frozen=True)
class Detach:
    """Drop a model (it went to sleep): the worker keeps no reference to its weights."""

    name: str


@dataclass
class PoolInit:
    """A pooled worker's first message: its phase, pool, threads and the models to attach."""

    label: str
    phase: Phase
    pool: torch.Tensor  # the KV pool's byte buffer of the worker's rank
    block_bytes: int
    threads: int  # intra-op threads: the CPU analogue of the SM share class
    attach: tuple[Attach, ...] = ()


@dataclass(frozen=True)
class Report:
    """Ask a pooled worker what it holds; it answers with a `WorkerReport`."""


@dataclass(frozen=True)
class WorkerReport:
    """What a pooled worker holds: each attached model with the bytes of its weights."""

    pid: int
    models: tuple[tuple[str, int], ...]  # (name, weight bytes), sorted by name
