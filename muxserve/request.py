"""A request's whole state, from admission to finish; torch-free.

Prefill vs decode is derived from token counts, not stored: a request is decoding when every
token but the last sampled one is in the KV cache.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from muxserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from muxserve.step_controls import RequestControls


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued; holds no blocks
    RUNNING = "running"  # admitted; holds blocks
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token, or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # the client went away or asked
    ERROR = "error"  # the worker failed
    TIMEOUT = "timeout"  # not finished within engine.request_timeout_s of its arrival


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprob of a token (sampled, or of the prompt) and the top alternatives at its step."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    rank: int | None = None  # the token's rank at its step (1: most likely), where computed


class OutputCheck(Protocol):
    """What decides a request's end beyond its stop ids and lengths: stop strings, which need
    its text, and a grammar that is complete or refuses a token. The engine gives one to each
    request; the scheduler asks it once per new token, where it checks the stop ids and lengths,
    so the end is decided in one place."""

    def check(self, req: Request, reason: FinishReason | None) -> FinishReason | None:
        """The request's end after its last token: `reason` as the stop ids and lengths
        decided it (None: it goes on), or the end the text or the grammar calls for."""
        ...


@dataclass(eq=False)
class Request:
    """One generation request for one model."""

    request_id: str
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    seed: int  # sampling seed: the request's own, or one drawn at admission
    eos_token_ids: frozenset[int] = frozenset()
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the pool
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    num_retries: int = 0  # times recomputed because the job running it was lost (worker died)
    in_flight: bool = False  # a job that includes this request is running
    pending_finish: FinishReason | None = None  # finish asked while in flight: apply on return
    # logprobs of prompt tokens 1.. (the first has none), when params.prompt_logprobs is set
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    history_sent: bool = False  # its decode runner was sent the tokens before its first step
    scheduled_time: float | None = None  # first admitted (time.monotonic()), for metrics
    wake_time: float = 0.0  # of its queue time, how long it waited for its model to wake
    controls: RequestControls | None = None  # grammar, allowed ids, bad words (engine only)
    output_check: OutputCheck | None = None  # stop strings, a grammar's end (engine only)
    # Derived from the fields above once, for the scheduler's per-step loops:
    # the tokens that end it once min_tokens are out: its stop tokens, and EOS unless ignored
    stop_ids: frozenset[int] = field(init=False, default=frozenset())
    # tokens masked until min_tokens are out: the stop tokens (none without min_tokens)
    banned: frozenset[int] = field(init=False, default=frozenset())
    penalised: bool = field(init=False, default=False)  # `params.has_penalties`

    def __post_init__(self) -> None:
        params = self.params
        eos = frozenset() if params.ignore_eos else self.eos_token_ids
        self.stop_ids = eos | frozenset(params.stop_token_ids)
        if params.min_tokens:
            self.banned = self.stop_ids
        self.penalised = params.has_penalties

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs were asked for and some are still missing (the first has none)."""
        return (
            self.params.prompt_logprobs is not None
            and len(self.prompt_logprobs) < self.num_prompt_tokens - 1
        )

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_decoding(self) -> bool:
        return self.num_computed_tokens == self.num_tokens - 1 and bool(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_at(self, pos: int) -> int:
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[pos] if pos < p else self.output_token_ids[pos - p]

    def tokens_from(self, start: int, end: int) -> tuple[int, ...]:
        p = len(self.prompt_token_ids)
        if end <= p:
            return tuple(self.prompt_token_ids[start:end])
        return tuple(self.all_token_ids[start:end])
