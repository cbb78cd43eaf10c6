"""The event-driven scheduler over the shared KV pool (ADBS, or the FCFS / static baselines).

`schedule()` hands out jobs for idle (model, phase) workers; `on_job_done()` applies their
results. The same object drives the inline executor, worker processes and the simulator. Its
parts, each owned by the `Scheduler`: `ModelSet` (the models, asleep or awake, and the pool
split over them), `Intake` (new requests), `Batcher` (what a job holds) and `Outcomes` (what
a job's results do).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from muxserve.config import EngineConfig
from muxserve.request import FinishReason, Request
from muxserve.scheduler.batcher import Batcher
from muxserve.scheduler.intake import Intake
from muxserve.scheduler.job import Job, JobResult, Phase
from muxserve.scheduler.model_set import ModelSet
from muxserve.scheduler.model_slot import ModelSlot
from muxserve.scheduler.outcomes import Outcomes
from muxserve.scheduler.policy import AdbsPolicy, FcfsPolicy, JobPolicy
from muxserve.scheduler.quota import AdaptiveQuota, QuotaPolicy, StaticQuota

SM_EPSILON = 1e-9  # shares are floats: 0.01 + 0.26 + 0.93 must fit a 1.2 limit


@dataclass(frozen=True)
class ModelStats:
    """A model's scheduling state, for metrics."""

    waiting: int
    running: int
    blocks_used: int
    blocks_quota: int
    preemptions: int = 0  # of this model's requests, since the scheduler started


@dataclass(frozen=True)
class SchedulerSnapshot:
    """Every model's state and the pool's, taken at one moment (for metrics)."""

    models: dict[str, ModelStats]
    blocks_total: int
    blocks_free: int
    preemptions: int


class Scheduler:
    """Per-model queues over one pool; forms jobs and applies their results."""

    def __init__(
        self,
        slots: Sequence[ModelSlot],
        num_blocks: int,
        *,
        policy: JobPolicy,
        quota: QuotaPolicy,
        prefill_token_budget: int = 2048,
        max_batch_size: int = 256,
        rebalance_interval: int = 8,
        sm_overload: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        asleep: Collection[str] = (),
    ) -> None:
        """`clock` times completions, for each model's service rate (a simulator passes its
        own). The models in `asleep` start asleep: no quota, no jobs, until `wake_model`."""
        self.policy = policy
        self.quota = quota
        self._needs_rebalance = False
        self.models = ModelSet(
            slots, num_blocks, quota, asleep=asleep, rebalance_later=self._rebalance_later
        )
        # the model set's own objects, changed in place only: the hot loop reads them
        m = self.models
        self.queues, self._order, self.asleep = m.queues, m.order, m.asleep
        self.pool, self.tables = m.pool, m.tables
        self.rebalance_interval = rebalance_interval
        self.sm_limit = 1.0 + sm_overload
        self.clock = clock
        self._requests: dict[str, Request] = {}  # every request held, shared with its parts
        self._in_flight: dict[int, Job] = {}
        # the requests that finished (or were aborted) between the previous round and the
        # last one, their blocks freed: whoever mirrors their tables may drop them
        self.finished_before_round: tuple[str, ...] = ()
        self._sm_in_use = 0.0
        self._next_job_id = 0
        self._steps = 0
        self.batcher = Batcher(
            self.pool,
            self.tables,
            prefill_token_budget=prefill_token_budget,
            max_batch_size=max_batch_size,
            rebalance=self.models.rebalance,
            on_short=self._rebalance_later,
        )
        self.intake = Intake(self._requests, self.pool, quota, clock)
        self.outcomes = Outcomes(
            self._requests,
            self.tables,
            self.batcher,
            adaptive=quota.adaptive,
            clock=clock,
            rebalance_later=self._rebalance_later,
        )

    @classmethod
    def create(
        cls,
        slots: Sequence[ModelSlot],
        num_blocks: int,
        config: EngineConfig,
        *,
        sm_admission: bool = True,
        clock: Callable[[], float] = time.monotonic,
        asleep: Collection[str] = (),
    ) -> Scheduler:
        """The scheduler the config asks for: policy adbs|fcfs, kv_mode unified|static;
        without `sm_admission` jobs of different models run at once whatever their shares."""
        policy: JobPolicy = AdbsPolicy() if config.policy == "adbs" else FcfsPolicy()
        return cls(
            slots,
            num_blocks,
            policy=policy,
            quota=AdaptiveQuota() if config.kv_mode == "unified" else StaticQuota(),
            prefill_token_budget=config.prefill_token_budget,
            max_batch_size=config.max_batch_size,
            rebalance_interval=config.rebalance_interval,
            sm_overload=config.sm_overload if sm_admission else math.inf,
            clock=clock,
            asleep=asleep,
        )

    # ---- requests ----------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Queue a request; raises before anything is allocated if it can never run."""
        self.intake.add(self.queues[req.model], req)

    def get(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def abort(self, request_id: str) -> Request | None:
        """Abort a request and free its blocks (at once, or when its job returns)."""
        return self.finish(request_id, FinishReason.ABORT)

    def finish(self, request_id: str, reason: FinishReason) -> Request | None:
        """End a request early (an abort, a timeout); None if it is unknown or done."""
        req = self._requests.get(request_id)
        if req is None:
            return None
        if req.in_flight:
            req.pending_finish = reason
        else:
            self.outcomes.finish(self.queues[req.model], req, reason)
        return req

    def has_work(self) -> bool:
        return bool(self._requests)

    def has_runnable_work(self) -> bool:
        """Work that `schedule()` could give out now: not only requests of asleep models."""
        if not self.asleep or self._in_flight:
            return bool(self._requests)
        return any(q.has_work() for q in self.models.awake().values())

    def overdue(self, limit_s: float) -> list[str]:
        """Requests that arrived more than `limit_s` ago and are not in a running job (one
        that is ends when its job returns, the next call): those to end with a timeout."""
        cutoff = self.clock() - limit_s
        return [
            rid
            for rid, req in self._requests.items()
            if req.arrival_time < cutoff and not req.in_flight
        ]

    @property
    def num_jobs_started(self) -> int:
        return self._next_job_id

    @property
    def jobs_in_flight(self) -> int:
        return len(self._in_flight)

    # ---- steps -------------------------------------------------------------------------
    def schedule(self) -> list[Job]:
        """Jobs to start now: one per idle (model, phase) with work, within the SM budget.
        What else changed since the previous round: `finished_before_round`; in the jobs,
        each one's new block tables (`Job.fresh`)."""
        self._steps += 1
        self.finished_before_round = self.outcomes.take_finished()
        # a static partition rebalances too: to take back the shares it lent to awake models
        if self._needs_rebalance or self._steps % self.rebalance_interval == 0:
            self.models.rebalance()
            self._needs_rebalance = False
        jobs = self._form_jobs()
        if not jobs and not self._in_flight and self._needs_rebalance:
            # Idle with work that is short of quota: rebalance now, not at the next call, which
            # an event-driven caller would only make once something else happened.
            self.models.rebalance()
            self._needs_rebalance = False
            jobs = self._form_jobs()
        return jobs

    def _form_jobs(self) -> list[Job]:
        cap = self.policy.max_jobs_in_flight
        jobs: list[Job] = []
        for q, phase in self.policy.candidates(self._order, len(self._in_flight)):
            if cap is not None and len(self._in_flight) >= cap:
                break
            if q.name in self.asleep:  # its requests wait for its wake
                continue
            share = phase.share(q.slot.sm_share)
            over = self._sm_in_use + share > self.sm_limit + SM_EPSILON
            if phase in q.busy or (self._in_flight and over):
                continue
            batcher = self.batcher
            if phase is Phase.PREFILL:
                seqs, admitted = batcher.prefill(q)
                fresh = tuple(admitted)
            else:
                seqs, fresh = batcher.decode(q), ()
            if not seqs:
                continue
            job = Job(self._next_job_id, q.name, phase, tuple(seqs), share, fresh)
            self._next_job_id += 1
            q.busy.add(phase)
            self._in_flight[job.job_id] = job
            self._sm_in_use += share
            jobs.append(job)
        return jobs

    def on_job_done(self, job: Job, result: JobResult) -> list[Request]:
        """Apply a job's outputs; returns the requests that changed (new token or finished).
        A result that does not match its job is refused before anything changes (ValueError):
        the job stays in flight."""
        if result.error is None and len(result.outputs) != len(job.seqs):
            raise ValueError(
                f"job {job.job_id} ({job.model}): {len(result.outputs)} outputs for "
                f"{len(job.seqs)} sequences"
            )
        self._in_flight.pop(job.job_id)
        q = self.queues[job.model]
        q.busy.discard(job.phase)
        self._sm_in_use = max(self._sm_in_use - job.sm_share, 0.0) if self._in_flight else 0.0
        if result.error is not None:
            return self.outcomes.failed(q, job, result.retry)
        return self.outcomes.apply(q, job, result)

    def _rebalance_later(self) -> None:
        """Work waits on quota, blocks were freed, or the models changed: rebalance next step."""
        self._needs_rebalance = True

    @property
    def num_preemptions(self) -> int:
        return self.batcher.num_preemptions

    @property
    def preemptions_by_model(self) -> dict[str, int]:
        return {n: q.preemptions for n, q in self.queues.items()}

    # ---- the models: sleep and wake, join and leave (a mesh that changes shape) --------------
    def in_flight(self, model: str) -> int:
        """Requests of `model` waiting or running (a sleep must wait until none are)."""
        q = self.queues[model]
        return len(q.waiting) + len(q.running)

    def sleep_model(self, model: str) -> None:
        """`model` runs no more jobs and its quota returns to the pool (`ModelSet.sleep`); its
        new requests wait for `wake_model`. ValueError while it has requests running."""
        self.models.sleep(model)

    def wake_model(self, model: str) -> None:
        """`model` runs jobs again (`ModelSet.wake`)."""
        self.models.wake(model)

    def add_model(self, slot: ModelSlot) -> None:
        """A model joins, asleep: no quota and no jobs until `wake_model`."""
        self.models.add(slot)

    def remove_model(self, model: str) -> None:
        """An asleep model with no requests leaves; ValueError otherwise."""
        self.models.remove(model)

    # ---- introspection -----------------------------------------------------------------
    def stats(self) -> dict[str, ModelStats]:
        return {
            n: ModelStats(
                len(q.waiting),
                len(q.running),
                self.pool.used(n),
                self.pool.quota(n),
                q.preemptions,
            )
            for n, q in self.queues.items()
        }

    def snapshot(self) -> SchedulerSnapshot:
        return SchedulerSnapshot(
            self.stats(), self.pool.num_blocks, self.pool.num_free, self.num_preemptions
        )

    def check_integrity(self) -> None:
        """The pool's invariants, plus: exactly the running requests hold blocks."""
        self.pool.check_integrity()
        running = {r.request_id for q in self._order for r in q.running}
        waiting = {r.request_id for q in self._order for r in q.waiting}
        assert not running & waiting, "a request is both running and waiting"
        assert running | waiting == set(self._requests), "request index out of sync"
        assert self.tables.holders() == len(running), "a non-running request holds blocks"
        for m in self.asleep:  # a sleeping model holds no KV and no quota
            assert not self.queues[m].running, f"{m} is asleep with requests running"
            assert self.pool.used(m) == 0, f"{m} is asleep and holds blocks"
            assert self.pool.quota(m) == 0, f"{m}: asleep with a quota"
        for q in self._order:
            partial = [r for r in q.running if not r.is_decoding]
            assert partial == q.prefilling, f"{q.name}: prefilling list out of sync"
        for q in self._order:
            for r in q.running:
                have = self.tables.num_logical(r.request_id) * q.slot.layout.tokens_per_block
                assert have >= r.num_computed_tokens, (
                    f"{r.request_id}: computed tokens without blocks"
                )
