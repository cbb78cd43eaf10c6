"""The typed seam between scheduler and executor: a job to run and the result it gives back."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from muxserve.config import SMShare
from muxserve.request import TokenLogprobs
from muxserve.sampling_params import SamplingParams


class Phase(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"

    def share(self, sm_share: SMShare) -> float:
        """The SM share this phase's jobs run at, of a model's `sm_share`."""
        return sm_share.prefill if self is Phase.PREFILL else sm_share.decode


# SeqWork and SeqResult are built once per sequence per step: slotted, not frozen, because a
# frozen dataclass costs 2.4 us to build against 0.9 us (treat them as immutable all the same).
@dataclass(slots=True)
class SeqWork:
    """One sequence's share of a job: which tokens to compute, where its KV lives."""

    request_id: str
    token_ids: tuple[int, ...]  # tokens to feed now (a prefill chunk, or the last token)
    start_pos: int  # tokens of this sequence already in the pool; positions start here
    block_table: np.ndarray  # (num_logical_blocks, layers, kv_heads) int32, covers all tokens
    sample: bool  # the chunk ends at the last known token: sample the next one
    params: SamplingParams
    seed: int  # the request's sampling seed (given, or drawn at admission)
    step: int  # index of the output token being sampled: with `seed`, fixes its randomness
    # Only for the requests that use them (None / empty otherwise):
    # the sequence's tokens before start_pos, sent once per admission with its first decode
    # step, for requests whose sampling reads them (penalties): the decode runner may be a
    # process that did not see the prefill. Later steps add one token each.
    history: tuple[int, ...] | None = None
    banned: frozenset[int] = frozenset()  # not to be sampled now: stop tokens before min_tokens
    allowed: np.ndarray | None = None  # (ceil(vocab / 32),) int32 bitmask of the tokens this
    # step may sample (structured output), bit i of word i // 32 for token i
    prompt_len: int = 0  # > 0: score this chunk's prompt tokens (positions < prompt_len)
    next_token: int | None = None  # with prompt_len: the prompt token after this chunk

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class Job:
    """One forward pass of one model in one phase over a batch of its sequences."""

    job_id: int
    model: str
    phase: Phase
    seqs: tuple[SeqWork, ...]
    sm_share: float  # fraction of the device's SMs this job may use
    # requests whose block table starts anew in this job (admitted from the waiting queue:
    # the first time, or again after a preemption): whoever mirrors their tables drops the
    # old ones. The scheduler says so; nothing downstream guesses it from positions.
    fresh: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


@dataclass(slots=True)
class SeqResult:
    """What a job produced for one sequence; `token_id` is None when it did not sample."""

    request_id: str
    token_id: int | None
    logprob: float | None = None  # of the sampled token, when logprobs were asked for
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()  # of prompt tokens, from `prompt_start`
    prompt_start: int = 0  # position of the first token in `prompt_logprobs`


@dataclass(frozen=True)
class JobResult:
    """The outcome of a job, aligned with `job.seqs`; `error` is set when the job failed."""

    job_id: int
    outputs: tuple[SeqResult, ...]
    error: str | None = None
    retry: bool = False  # with `error`: the workers failed, not the requests; recompute them

    def __post_init__(self) -> None:
        if self.retry and self.error is None:
            raise ValueError(f"job {self.job_id}: retry=True needs the error that caused it")
