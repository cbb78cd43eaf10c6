"""How each worker process starts: its init message and its environment.

Per (model, phase, TP rank) for `per_model` workers (`rank_plans`), or per SM-share class for
pooled ones (`env_of`). The environment is what a process cannot change once it runs: its MPS
thread percentage on a GPU, its intra-op thread count on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable

from muxserve.executor.base import ModelSpec, cpu_threads
from muxserve.executor.messages import TPRank, WorkerInit
from muxserve.executor.mps_daemon import MpsDaemon
from muxserve.executor.worker_group import RankPlan
from muxserve.models.causal_lm import CausalLM
from muxserve.runner.kv_pool import KVPool
from muxserve.scheduler.job import Phase


def env_of(daemon: MpsDaemon | None) -> Callable[[float, int], dict[str, str]]:
    """`worker_env` for this executor's daemon: a pooled worker's environment by share."""
    return lambda share, threads: worker_env(daemon, share, threads)


def rank_plans(
    spec: ModelSpec,
    phase: Phase,
    ranks: list[tuple[CausalLM, KVPool]],
    daemon: MpsDaemon | None,
) -> list[RankPlan]:
    """How to start each rank's worker of `spec` in `phase`: its model shard, pool and share."""
    share = phase.share(spec.sm_share)
    plans = []
    for rank, (model, pool) in enumerate(ranks):
        on_cpu = pool.buffer.device.type == "cpu"
        tp = None
        if spec.tensor_parallel > 1:
            tp = TPRank(rank, spec.tensor_parallel, "", "gloo" if on_cpu else "nccl")
        threads = cpu_threads(share) if on_cpu else 1
        init = WorkerInit(
            spec.name,
            phase,
            model,
            spec.config,
            pool.buffer,
            pool.block_bytes,
            spec.layout,
            spec.dtype,
            threads,
            tp,
            spec.max_model_len,
        )
        plans.append(RankPlan(init, worker_env(daemon, share, threads)))
    return plans


def worker_env(daemon: MpsDaemon | None, share: float, threads: int) -> dict[str, str]:
    """A worker's environment: its MPS client settings on CUDA, its thread count on CPU."""
    if daemon is not None:
        return daemon.client_env(share)
    return {"OMP_NUM_THREADS": str(threads)}
