"""Runs one model's jobs: forward over the pool, then sampling."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from muxserve.kv.layout import KVLayout
from muxserve.models.causal_lm import CausalLM
from muxserve.models.hf_config import HFModelConfig
from muxserve.request import TokenLogprobs
from muxserve.runner.attention import BatchLayout
from muxserve.runner.cuda_graphs import DecodeGraphs
from muxserve.runner.device_tables import DeviceTables
from muxserve.runner.kernels import ops
from muxserve.runner.kv_pool import KVPool
from muxserve.runner.model_weights import ModelWeights
from muxserve.runner.sampler import SampledBatch, sample
from muxserve.runner.token_history import TokenHistory
from muxserve.scheduler.job import Job, JobResult, SeqResult, SeqWork

log = logging.getLogger(__name__)

SCORE_ROWS = 512  # prompt positions scored at once: bounds the (rows, vocab) logits in memory


@dataclass
class PromptScores:
    """Logprobs of one chunk's prompt tokens, still on the device."""

    request_id: str
    start: int  # position of the first scored token
    token_ids: list[int]  # the scored tokens
    logprobs: torch.Tensor  # (M,) float32
    ranks: torch.Tensor  # (M,) int64, 1: the most likely token
    top_ids: torch.Tensor  # (M, k) int64
    top_logprobs: torch.Tensor  # (M, k) float32

    def to_logprobs(self) -> tuple[TokenLogprobs, ...]:
        lps, ranks = self.logprobs.tolist(), self.ranks.tolist()
        tids, tlps = self.top_ids.tolist(), self.top_logprobs.tolist()
        return tuple(
            TokenLogprobs(t, lp, tuple(zip(ti, tl, strict=True)), rank)
            for t, lp, rank, ti, tl in zip(self.token_ids, lps, ranks, tids, tlps, strict=True)
        )


@dataclass
class LaunchedJob:
    """A job whose work is queued on the device; `collect` waits for it."""

    job: Job
    sampled: SampledBatch | None  # None when no sequence of the job samples
    error: str | None = None
    scores: list[PromptScores] | None = None  # prompt logprobs of the chunks that asked


class ModelRunner:
    """One model's weights and its view of the shared pool."""

    def __init__(
        self,
        name: str,
        model: CausalLM | None,
        config: HFModelConfig,
        pool: KVPool,
        layout: KVLayout,
        dtype: torch.dtype,
        max_model_len: int | None = None,
        weight_bytes: int = 0,
        device_tables: bool | None = None,
    ) -> None:
        """`max_model_len` is the served context (default the config's
        `max_position_embeddings`): what per-position buffers are sized for. `model` None: not
        loaded yet (asleep at level 2), with `weight_bytes` its checkpoint's estimate.
        `device_tables`: keep the block tables on the device (`DeviceTables`); by default
        everywhere but the CPU, whose path reads the host's tables."""
        self.name = name
        self._model: CausalLM | None = model
        self.config = config
        self.layout = layout
        self.max_model_len = max_model_len
        self.device = pool.buffer.device
        self.cache = pool.view(layout, dtype)  # (num_blocks, 2, tokens_per_block, head_dim)
        if device_tables is None:
            device_tables = self.device.type != "cpu"
        max_context = max_model_len or config.max_position_embeddings
        self.device_tables = (
            DeviceTables(
                self.device,
                config.num_layers,
                layout.num_kv_heads,  # one rank's heads under TP
                layout.logical_blocks_for(max_context),
            )
            if device_tables
            else None
        )
        # decode steps replay CUDA graphs where they fit one (CUDA with the kernels only)
        self.graphs = None if model is None else self._make_graphs(model)
        # token histories of the sequences whose sampling reads them (penalties)
        self.histories: dict[str, TokenHistory] = {}
        self.weights = ModelWeights(model, weight_bytes)

    @property
    def model(self) -> CausalLM:
        """The model; a sleeping runner has none on the device (the scheduler runs no job of
        it), and asking is a bug."""
        if self._model is None or not self.weights.on_device:
            raise RuntimeError(f"{self.name} is asleep: its weights are not on the device")
        return self._model

    def _make_graphs(self, model: CausalLM) -> DecodeGraphs | None:
        return DecodeGraphs.create(
            model,
            self.cache,
            self.max_model_len or self.config.max_position_embeddings,
            self.config.num_layers,
            self.layout.num_kv_heads,  # one rank's heads: the block tables' width under TP
            self.config.layer_sliding_windows,
        )

    # ---- sleep and wake ---------------------------------------------------------------------
    def sleep(self, level: int) -> None:
        """Take the weights off the device: to host memory (level 1) or dropped (level 2).

        The decode graphs go too (they hold the weights' addresses); histories are of requests
        that have all finished by now.
        """
        self.graphs = None
        if level == 1 and self._model is not None:
            try:
                self.weights.to_host(self._model, self.max_model_len)
                return
            except Exception:  # e.g. no pinned host memory left: drop them (level 2) instead
                log.exception("%s: keeping the weights in host memory failed; dropped", self.name)
        self._model = None
        self.weights.dropped()

    def wake(self, load: Callable[[], CausalLM]) -> None:
        """Put the weights back on the device: from host memory, or `load()` them (level 2).

        Its decode graphs are made again, empty: the executor captures them (`warm_up`) right
        after, on the model's decode stream.
        """
        if self._model is None:
            self._model = load()
            self.weights = ModelWeights(self._model)
        elif not self.weights.on_device:
            try:
                self.weights.to_device(self._model, self.device, self.max_model_len)
            except BaseException:  # e.g. out of device memory half-way: give back what moved
                self.sleep(1)
                raise
        self.graphs = self._make_graphs(self._model)

    def release(self, request_ids: Sequence[str]) -> None:
        """These requests finished: forget what the runner keeps of them."""
        for rid in request_ids:
            self.histories.pop(rid, None)
        if self.device_tables is not None:
            self.device_tables.release(request_ids)

    def execute(self, job: Job) -> JobResult:
        """Run a job to completion (launch, then collect)."""
        return self.collect(self.launch(job))

    @torch.inference_mode()
    def launch(self, job: Job) -> LaunchedJob:
        """Queue the forward pass and sampling on the current stream; no host sync."""
        try:
            self._feed_histories(job.seqs)
            sampling = [i for i, s in enumerate(job.seqs) if s.sample]
            tables = self.device_tables
            graphed = None if self.graphs is None else self.graphs.run(job.seqs, tables, job.fresh)
            if graphed is not None:  # (B, vocab) logits of a decode step
                if not sampling:
                    return LaunchedJob(job, None)
                rows = torch.tensor(sampling, device=self.device)
                seqs = [job.seqs[i] for i in sampling]
                return LaunchedJob(job, sample(graphed[rows], seqs, self.histories))
            tokens = [t for s in job.seqs for t in s.token_ids]
            input_ids = torch.tensor(tokens, dtype=torch.int64, device=self.device)  # (T,)
            padded = None  # the job's padded block tables, gathered on the device
            if tables is not None:
                slots = tables.update(job.seqs, job.fresh)
                padded = tables.gather(slots, max(s.block_table.shape[0] for s in job.seqs))
            batch = BatchLayout.from_seqs(job.seqs, self.device, padded)
            attention = ops.make_attention(
                self.cache,
                batch,
                self.config.layer_sliding_windows,
                max(len(s.token_ids) for s in job.seqs),
                max(s.end_pos for s in job.seqs),
                self.config.attn_logit_softcap,
            )
            hidden = self.model(input_ids, batch.pos_of_token, attention)  # (T, hidden)
            scores = self._score_prompts(hidden, job.seqs)
            if not sampling:
                return LaunchedJob(job, None, scores=scores)
            last = torch.cumsum(batch.q_lens, 0) - 1  # (B,) index of each sequence's last token
            rows = last[torch.tensor(sampling, device=self.device)]
            logits = self.model.compute_logits(hidden[rows])  # (N, vocab) float32
            seqs = [job.seqs[i] for i in sampling]
            return LaunchedJob(job, sample(logits, seqs, self.histories), scores=scores)
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
        for sc in launched.scores or ():
            out = next(o for o in outputs if o.request_id == sc.request_id)
            out.prompt_logprobs, out.prompt_start = sc.to_logprobs(), sc.start
        return JobResult(job.job_id, outputs)

    def _feed_histories(self, seqs: Sequence[SeqWork]) -> None:
        """Record the tokens this job feeds, for the sequences that keep a history."""
        for s in seqs:
            if s.params.has_penalties:
                history = self.histories.setdefault(s.request_id, TokenHistory())
                history.feed(s.request_id, s.start_pos, s.token_ids, s.history)

    def _score_prompts(
        self, hidden: torch.Tensor, seqs: Sequence[SeqWork]
    ) -> list[PromptScores] | None:
        """Logprobs of the prompt tokens of the chunks that ask for them (`prompt_len`).

        The logits at position p give the logprob of the token at p + 1: this chunk's next
        token, or for its last position the chunk's `next_token`.
        """
        if not any(s.prompt_len for s in seqs):
            return None
        scores, offset = [], 0  # offset: the chunk's first row in `hidden`
        for s in seqs:
            n = len(s.token_ids)
            m = min(n, s.prompt_len - s.start_pos - 1)  # rows whose target is a prompt token
            if s.prompt_len and m > 0:
                targets = [*s.token_ids[1:], *(() if s.next_token is None else (s.next_token,))]
                k = s.params.prompt_logprobs or 0
                rows = hidden[offset : offset + m]
                scores.append(self._score(s.request_id, s.start_pos + 1, rows, targets[:m], k))
            offset += n
        return scores

    def _score(
        self, request_id: str, start: int, hidden: torch.Tensor, targets: list[int], k: int
    ) -> PromptScores:
        """Logprob, rank and top-k at each row of `hidden` (M, hidden) of its target token."""
        parts: list[tuple[torch.Tensor, ...]] = []
        for lo in range(0, len(targets), SCORE_ROWS):
            logits = self.model.compute_logits(hidden[lo : lo + SCORE_ROWS])  # (m, vocab)
            logp = torch.log_softmax(logits.float(), dim=-1)
            tgt = torch.tensor(targets[lo : lo + SCORE_ROWS], device=self.device)[:, None]
            lp = logp.gather(1, tgt)  # (m, 1)
            rank = (logp > lp).sum(dim=-1) + 1
            top = logp.topk(k, dim=-1)
            parts.append((lp[:, 0], rank, top.indices, top.values))
        lps, ranks, ids, values = (torch.cat(p) for p in zip(*parts, strict=True))
        return PromptScores(request_id, start, targets, lps, ranks, ids, values)
