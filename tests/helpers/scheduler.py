"""Small builders for scheduler tests, and a zero-cost fake runner that drives a Scheduler."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from muxserve.config import EngineConfig, SMShare
from muxserve.kv.layout import KVLayout
from muxserve.request import Request
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import Job, JobResult, Phase, SeqResult
from muxserve.scheduler.model_slot import ModelSlot
from muxserve.scheduler.scheduler import Scheduler

TokenFn = Callable[[str, int], int]  # (request id, output step) -> token id
ErrorFn = Callable[[Job], str | None]  # a job -> an error message, or None for success


def make_layout(
    *,
    num_layers: int = 1,
    num_kv_heads: int = 1,
    head_dim: int = 8,
    dtype_bytes: int = 2,
    block_bytes: int = 128,
) -> KVLayout:
    """Defaults: 4 tokens per block, 1 physical block per logical block."""
    return KVLayout(num_layers, num_kv_heads, head_dim, dtype_bytes, block_bytes)


def make_slot(
    name: str = "a",
    *,
    layout: KVLayout | None = None,
    max_model_len: int = 64,
    rate: float = 1.0,
    prefill_share: float = 1.0,
    decode_share: float = 1.0,
    max_waiting: int = 1024,
    kv_share: float | None = None,
    max_queue_wait_s: float | None = None,
) -> ModelSlot:
    return ModelSlot(
        name=name,
        layout=layout or make_layout(),
        max_model_len=max_model_len,
        rate=rate,
        sm_share=SMShare(prefill=prefill_share, decode=decode_share),
        max_waiting=max_waiting,
        kv_share=kv_share,
        max_queue_wait_s=max_queue_wait_s,
    )


def make_request(
    request_id: str,
    model: str = "a",
    *,
    prompt: int | list[int] = 4,
    max_tokens: int = 4,
    arrival: float = 0.0,
    eos: Iterable[int] = (),
    seed: int = 0,
    **params: object,
) -> Request:
    """A request whose prompt is `prompt` tokens 1000, 1001, ... (or the given ids)."""
    ids = list(range(1000, 1000 + prompt)) if isinstance(prompt, int) else list(prompt)
    return Request(
        request_id=request_id,
        model=model,
        prompt_token_ids=ids,
        params=SamplingParams(max_tokens=max_tokens, **params),  # type: ignore[arg-type]
        arrival_time=arrival,
        seed=seed,
        eos_token_ids=frozenset(eos),
    )


def make_scheduler(
    slots: list[ModelSlot],
    num_blocks: int,
    *,
    policy: str = "adbs",
    kv_mode: str = "unified",
    clock: Callable[[], float] = time.monotonic,
    **engine: object,
) -> Scheduler:
    """A scheduler built the way the engine builds it: from an EngineConfig."""
    config = EngineConfig(policy=policy, kv_mode=kv_mode, **engine)  # type: ignore[arg-type]
    return Scheduler.create(slots, num_blocks, config, clock=clock)


def step_token(request_id: str, step: int) -> int:
    """A deterministic fake token: the same (request, step) always gives the same id."""
    return 10 * step + sum(map(ord, request_id)) % 7


def result_for(job: Job, token_fn: TokenFn, error: str | None = None) -> JobResult:
    """What a runner returns: a token for each sampling sequence, None for the others."""
    if error is not None:
        return JobResult(job.job_id, (), error=error)
    outputs = tuple(
        SeqResult(s.request_id, token_fn(s.request_id, s.step) if s.sample else None)
        for s in job.seqs
    )
    return JobResult(job.job_id, outputs)


class FakeRunner:
    """Runs a scheduler's jobs at zero cost, one completion per step, oldest job first.

    Every step calls `schedule()`, completes the oldest job in flight, and checks the
    scheduler's integrity; a step where work remains but nothing is in flight or handed out
    is a stall, and fails.
    """

    def __init__(
        self, scheduler: Scheduler, token_fn: TokenFn = step_token, error_fn: ErrorFn | None = None
    ) -> None:
        self.scheduler = scheduler
        self.token_fn = token_fn
        self.error_fn = error_fn
        self.in_flight: list[Job] = []
        self.jobs: list[Job] = []  # every job handed out, in order
        self.finished: dict[str, Request] = {}  # finished by a job result

    def schedule(self) -> list[Job]:
        jobs = self.scheduler.schedule()
        self.scheduler.check_integrity()
        self.in_flight += jobs
        self.jobs += jobs
        assert self.in_flight or not self.scheduler.has_work(), (
            f"stall: work remains but no job was handed out ({self.scheduler.stats()})"
        )
        return jobs

    def complete(self, error: str | None = None) -> Job | None:
        """Finish the oldest job in flight (with `error`, or what `error_fn` says)."""
        if not self.in_flight:
            return None
        job = self.in_flight.pop(0)
        if error is None and self.error_fn is not None:
            error = self.error_fn(job)
        for req in self.scheduler.on_job_done(job, result_for(job, self.token_fn, error)):
            if req.is_finished:
                self.finished[req.request_id] = req
        self.scheduler.check_integrity()
        return job

    def step(self) -> None:
        self.schedule()
        self.complete()

    def drain(self, max_steps: int = 100_000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_work() and not self.in_flight:
                return
            self.step()
        raise AssertionError(f"no progress after {max_steps} steps")


def run_to_completion(
    scheduler: Scheduler, token_fn: TokenFn = step_token, error_fn: ErrorFn | None = None
) -> FakeRunner:
    """Drive `scheduler` until it has no work; returns the runner with its record of jobs."""
    runner = FakeRunner(scheduler, token_fn, error_fn)
    runner.drain()
    return runner


def job_kinds(jobs: Iterable[Job]) -> list[tuple[str, str]]:
    """(model, phase) of each job, e.g. ("a", "prefill")."""
    return [(j.model, j.phase.value) for j in jobs]


__all__ = [
    "FakeRunner",
    "Phase",
    "job_kinds",
    "make_layout",
    "make_request",
    "make_scheduler",
    "make_slot",
    "result_for",
    "run_to_completion",
    "step_token",
]
