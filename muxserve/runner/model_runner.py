"""Runs one model's jobs: forward over the pool, then sampling."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from muxserve import ops
from muxserve.kv.layout import KVLayout
from muxserve.models.causal_lm import CausalLM
from muxserve.models.hf_config import HFModelConfig
from muxserve.runner.attention import BatchLayout
from muxserve.runner.cuda_graphs import DecodeGraphs
from muxserve.runner.kv_pool import KVPool
from muxserve.runner.sampler import SampledBatch, sample
from muxserve.scheduler.job import Job, JobResult, SeqResult

log = logging.getLogger(__name__)


@dataclass
class LaunchedJob:
    """A job whose work is queued on the device; `collect` waits for it."""

    job: Job
    sampled: SampledBatch | None  # None when no sequence of the job samples
    error: str | None = None


class ModelRunner:
    """One model's weights and its view of the shared pool."""

    def __init__(
        self,
        name: str,
        model: CausalLM,
        config: HFModelConfig,
        pool: KVPool,
        layout: KVLayout,
        dtype: torch.dtype,
    ) -> None:
        self.name = name
        self.model = model
        self.config = config
        self.layout = layout
        self.device = pool.buffer.device
        self.cache = pool.view(layout, dtype)  # (num_blocks, 2, tokens_per_block, head_dim)
        # decode steps replay CUDA graphs where they fit one (CUDA with the kernels only)
        self.graphs = DecodeGraphs.create(
            model,
            self.cache,
            config.max_position_embeddings,
            config.num_layers,
            layout.num_kv_heads,  # one rank's heads: the block tables' width under TP
            config.layer_sliding_windows,
        )

    def execute(self, job: Job) -> JobResult:
        """Run a job to completion (launch, then collect)."""
        return self.collect(self.launch(job))

    @torch.inference_mode()
    def launch(self, job: Job) -> LaunchedJob:
        """Queue the forward pass and sampling on the current stream; no host sync."""
        try:
            sampling = [i for i, s in enumerate(job.seqs) if s.sample]
            graphed = None if self.graphs is None else self.graphs.run(job.seqs)
            if graphed is not None:  # (B, vocab) logits of a decode step
                if not sampling:
                    return LaunchedJob(job, None)
                rows = torch.tensor(sampling, device=self.device)
                return LaunchedJob(job, sample(graphed[rows], [job.seqs[i] for i in sampling]))
            tokens = [t for s in job.seqs for t in s.token_ids]
            input_ids = torch.tensor(tokens, dtype=torch.int64, device=self.device)  # (T,)
            batch = BatchLayout.from_seqs(job.seqs, self.device)
            attention = ops.make_attention(
                self.cache,
                batch,
                self.config.layer_sliding_windows,
                max(len(s.token_ids) for s in job.seqs),
                max(s.end_pos for s in job.seqs),
                self.config.attn_logit_softcap,
            )
            hidden = self.model(input_ids, batch.pos_of_token, attention)  # (T, hidden)
            if not sampling:
                return LaunchedJob(job, None)
            last = torch.cumsum(batch.q_lens, 0) - 1  # (B,) index of each sequence's last token
            rows = last[torch.tensor(sampling, device=self.device)]
            logits = self.model.compute_logits(hidden[rows])  # (N, vocab) float32
            return LaunchedJob(job, sample(logits, [job.seqs[i] for i in sampling]))
        except Exception as e:  # a failed job fails its requests, not the engine
            log.exception("%s: job %d failed", self.name, job.job_id)
            return LaunchedJob(job, None, f"{type(e).__name__}: {e}")

    def collect(self, launched: LaunchedJob) -> JobResult:
        """Wait for a launched job and return its per-sequence results, aligned with its seqs."""
        job = launched.job
        if launched.error is not None:
            return JobResult(job.job_id, (), launched.error)
        sampled = (
            {}
            if launched.sampled is None
            else {r.request_id: r for r in launched.sampled.to_results()}
        )
        outputs = tuple(sampled.get(s.request_id, SeqResult(s.request_id, None)) for s in job.seqs)
        return JobResult(job.job_id, outputs)
