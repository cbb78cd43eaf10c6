"""Small builders for executor tests: model specs on the demo checkpoints, hand-made jobs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from muxserve.config import SMShare
from muxserve.executor.base import ModelSpec
from muxserve.kv.layout import KVLayout
from muxserve.models.loader import validate_checkpoint
from muxserve.runner.kv_pool import PoolSizing
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import Job, Phase, SeqWork

BLOCK_BYTES = 4096
NUM_BLOCKS = 256
SIZING = PoolSizing(BLOCK_BYTES, NUM_BLOCKS * BLOCK_BYTES)
GREEDY = SamplingParams(temperature=0.0)


def make_spec(name: str, path: Path, share: float = 1.0, tp: int = 1) -> ModelSpec:
    config = validate_checkpoint(path)
    layout = KVLayout(config.num_layers, config.num_kv_heads // tp, config.head_dim, 4, BLOCK_BYTES)
    return ModelSpec(
        name, path, config, layout, torch.float32, SMShare(prefill=share, decode=share), tp
    )


def block_table(layout: KVLayout, first: int, num_tokens: int) -> np.ndarray:
    """Consecutive block ids from `first`, shaped (logical blocks, layers, kv heads)."""
    n = layout.logical_blocks_for(num_tokens)
    ids = np.arange(first, first + n * layout.blocks_per_logical, dtype=np.int32)
    return ids.reshape(n, layout.num_layers, layout.num_kv_heads)


def prefill_job(
    job_id: int, spec: ModelSpec, prompt: list[int], request_id: str, first_block: int
) -> Job:
    """One whole-prompt prefill that samples its first token greedily."""
    seq = SeqWork(
        request_id,
        tuple(prompt),
        0,
        block_table(spec.layout, first_block, len(prompt) + 8),
        True,
        GREEDY,
        seed=0,
        step=0,
    )
    share = Phase.PREFILL.share(spec.sm_share)
    return Job(job_id, spec.name, Phase.PREFILL, (seq,), share, fresh=(request_id,))


def decode_job(job_id: int, spec: ModelSpec, prev: Job, token: int, step: int) -> Job:
    """The next decode step of the single sequence of `prev`, feeding `token`."""
    s = prev.seqs[0]
    seq = SeqWork(s.request_id, (token,), s.end_pos, s.block_table, True, GREEDY, seed=0, step=step)
    return Job(job_id, spec.name, Phase.DECODE, (seq,), Phase.DECODE.share(spec.sm_share))
