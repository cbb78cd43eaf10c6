"""The event-driven scheduler over the shared KV pool (ADBS, or the FCFS / static baselines).

`schedule()` hands out jobs for idle (model, phase) workers; `on_job_done()` applies their
results. The same object drives the inline executor, worker processes and the simulator.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from muxserve.config import EngineConfig
from muxserve.errors import PromptTooLongError, QueueFullError
from muxserve.kv.block_pool import BlockPool
from muxserve.kv.block_tables import BlockTables
from muxserve.request import FinishReason, Request, RequestStatus, TokenLogprobs
from muxserve.scheduler.batcher import Batcher
from muxserve.scheduler.job import Job, JobResult, Phase, SeqResult
from muxserve.scheduler.model_slot import ModelQueue, ModelSlot
from muxserve.scheduler.policy import AdbsPolicy, FcfsPolicy, JobPolicy
from muxserve.scheduler.quota import AdaptiveQuota, QuotaPolicy, StaticQuota
from muxserve.scheduler.service_rate import retry_after_s

SM_EPSILON = 1e-9  # shares are floats: 0.01 + 0.26 + 0.93 must fit a 1.2 limit
MAX_RETRIES = 2  # a request whose jobs are lost this often fails (it may be what kills them)


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
        if not slots:
            raise ValueError("the scheduler needs at least one model")
        self.queues = {s.name: ModelQueue(s) for s in slots}
        self._order = list(self.queues.values())
        self.policy = policy
        self.quota = quota
        self.asleep: set[str] = set(asleep)
        # ADBS splits the pool over the awake models; a static partition gives every model its
        # share, then lends the sleeping ones' shares to the awake ones (StaticQuota)
        split = self._awake_queues() if quota.adaptive else self.queues
        initial = quota.initial(num_blocks, split) if split else {}
        self.pool = BlockPool(num_blocks, {n: initial.get(n, 0) for n in self.queues})
        self.tables = BlockTables(self.pool, {s.name: s.layout for s in slots})
        if self.asleep and not quota.adaptive:
            self._rebalance()
        self.rebalance_interval = rebalance_interval
        self.sm_limit = 1.0 + sm_overload
        self.clock = clock
        self._requests: dict[str, Request] = {}
        self._in_flight: dict[int, Job] = {}
        self._finished: list[str] = []  # finished since the last round began
        # the requests that finished (or were aborted) between the previous round and the
        # last one, their blocks freed: whoever mirrors their tables may drop them
        self.finished_before_round: tuple[str, ...] = ()
        self._sm_in_use = 0.0
        self._next_job_id = 0
        self._steps = 0
        self._needs_rebalance = False
        self.batcher = Batcher(
            self.pool,
            self.tables,
            prefill_token_budget=prefill_token_budget,
            max_batch_size=max_batch_size,
            rebalance=self._rebalance,
            on_short=self._short_of_quota,
            models=list(self.queues),
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
        q = self.queues[req.model]
        slot = q.slot
        total = req.num_prompt_tokens + req.params.max_tokens
        if req.num_prompt_tokens >= slot.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {req.num_prompt_tokens} tokens; {slot.name}'s context is "
                f"{slot.max_model_len} tokens",
                "prompt",
            )
        if total > slot.max_model_len:
            raise PromptTooLongError(
                f"{slot.name}'s context is {slot.max_model_len} tokens, but {total} were asked "
                f"({req.num_prompt_tokens} in the prompt, {req.params.max_tokens} to generate)",
                "max_tokens",
            )
        need = slot.layout.physical_blocks_for(total)
        ceiling = self.quota.ceiling(self.pool, slot.name)
        if need > ceiling:
            fits = ceiling // slot.layout.blocks_per_logical * slot.layout.tokens_per_block
            raise PromptTooLongError(
                f"{total} tokens of {slot.name} need {need} KV blocks; its share of the pool "
                f"holds {ceiling} blocks ({fits} tokens)",
                "max_tokens",
            )
        self._check_queue(q)
        if req.request_id in self._requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        if not q.has_work():
            q.service.on_busy(self.clock())
        self._requests[req.request_id] = req
        q.waiting.append(req)

    def _check_queue(self, q: ModelQueue) -> None:
        """QueueFullError when the model's queue is at `max_waiting`, or when what waits would
        take longer than `max_queue_wait_s` at the model's recent rate; its `retry_after` is
        that wait."""
        slot, waiting = q.slot, len(q.waiting)
        wait = q.service.expected_wait(waiting, self.clock())
        if waiting >= slot.max_waiting:
            raise QueueFullError(
                f"{slot.name}: {waiting} requests already waiting", "model", retry_after_s(wait)
            )
        bound = slot.max_queue_wait_s
        if bound is not None and wait is not None and wait > bound:
            raise QueueFullError(
                f"{slot.name}: {waiting} requests already waiting, about {wait:.0f} s at its "
                f"recent rate; over its max_queue_wait_s ({bound:g} s)",
                "model",
                retry_after_s(wait),
            )

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
            self._finish(self.queues[req.model], req, reason)
        return req

    def has_work(self) -> bool:
        return bool(self._requests)

    def has_runnable_work(self) -> bool:
        """Work that `schedule()` could give out now: not only requests of asleep models."""
        if not self.asleep or self._in_flight:
            return bool(self._requests)
        return any(q.has_work() for q in self._awake_queues().values())

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
        self.finished_before_round, self._finished = tuple(self._finished), []
        # a static partition rebalances too: to take back the shares it lent to awake models
        if self._needs_rebalance or self._steps % self.rebalance_interval == 0:
            self._rebalance()
            self._needs_rebalance = False
        jobs = self._form_jobs()
        if not jobs and not self._in_flight and self._needs_rebalance:
            # Idle with work that is short of quota: rebalance now, not at the next call, which
            # an event-driven caller would only make once something else happened.
            self._rebalance()
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
                seqs, fresh = batcher.prefill(q), tuple(batcher.admitted)
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
        """Apply a job's outputs; returns the requests that changed (new token or finished)."""
        self._in_flight.pop(job.job_id)
        q = self.queues[job.model]
        q.busy.discard(job.phase)
        self._sm_in_use = max(self._sm_in_use - job.sm_share, 0.0) if self._in_flight else 0.0
        if result.error is not None:
            return self._job_failed(q, job, result.retry)
        return self._apply(q, job, result)

    def _apply(self, q: ModelQueue, job: Job, result: JobResult) -> list[Request]:
        """Apply a finished job's outputs: its requests' computed tokens, and their sampled
        tokens, finishing a request where it stops: a stop token, a length, or what its
        output check says (a stop string, a grammar). The one place a request's end is
        decided, but for aborts and failed jobs.

        This loop runs once per request per step: it reads fields, not properties, keeps
        what is the same for the whole job in locals, and leaves the rare cases (a finish
        asked meanwhile, prompt logprobs, logprobs) to their branches.
        """
        if len(result.outputs) != len(job.seqs):
            raise ValueError(
                f"job {job.job_id} ({job.model}): {len(result.outputs)} outputs for "
                f"{len(job.seqs)} sequences"
            )
        changed: list[Request] = []
        requests, prefill = self._requests, job.phase is Phase.PREFILL
        max_len, finish = q.slot.max_model_len, self._finish
        for seq, out in zip(job.seqs, result.outputs, strict=True):
            req = requests.get(seq.request_id)
            if req is None:
                continue
            req.in_flight = False
            pending = req.pending_finish
            if pending is not None:
                finish(q, req, pending)
                changed.append(req)
                continue
            req.num_computed_tokens = seq.start_pos + len(seq.token_ids)  # seq.end_pos
            # A recomputed request whose chunk stops one short is decoding already: its last
            # token is an output token that the next decode step feeds.
            if prefill and (seq.sample or req.is_decoding):
                q.prefilling.remove(req)
            if out.prompt_logprobs:
                self._add_prompt_logprobs(req, out)
            params = req.params
            if params.max_tokens == 0 and req.num_computed_tokens == req.num_tokens:
                finish(q, req, FinishReason.LENGTH)  # prompt logprobs only: done
                changed.append(req)
                continue
            token = out.token_id
            if token is None:
                continue
            output = req.output_token_ids
            output.append(token)
            if params.logprobs is not None and out.logprob is not None:
                req.output_logprobs.append(TokenLogprobs(token, out.logprob, out.top_logprobs))
            n, reason = len(output), None
            if token in req.stop_ids and n > params.min_tokens:  # stop tokens are masked before
                reason = FinishReason.STOP
            elif n >= params.max_tokens or len(req.prompt_token_ids) + n >= max_len:
                reason = FinishReason.LENGTH
            if req.output_check is not None:
                reason = req.output_check.check(req, reason)
            if reason is not None:
                finish(q, req, reason)
            changed.append(req)
        return changed

    def _job_failed(self, q: ModelQueue, job: Job, retry: bool) -> list[Request]:
        """A job that failed: its requests are computed again where its workers were lost
        (`retry`, up to MAX_RETRIES times each), or end with an error; returns those ended."""
        changed: list[Request] = []
        for seq in job.seqs:
            req = self._requests.get(seq.request_id)
            if req is None:
                continue
            req.in_flight = False
            pending = req.pending_finish
            if pending is None and retry and req.num_retries < MAX_RETRIES:
                req.num_retries += 1  # its worker was lost, not its fault: compute it again
                self.batcher.preempt(q, req)
                continue
            self._finish(q, req, pending or FinishReason.ERROR)
            changed.append(req)
        return changed

    def _short_of_quota(self) -> None:
        """Work waits on quota, or blocks were freed by a preemption: rebalance next step."""
        self._needs_rebalance = True

    @property
    def num_preemptions(self) -> int:
        return self.batcher.num_preemptions

    @property
    def preemptions_by_model(self) -> dict[str, int]:
        return self.batcher.preemptions_by_model

    # ---- sleep and wake ----------------------------------------------------------------------
    def _awake_queues(self) -> dict[str, ModelQueue]:
        if not self.asleep:
            return self.queues
        return {n: q for n, q in self.queues.items() if n not in self.asleep}

    def _rebalance(self) -> None:
        awake = self._awake_queues()
        if awake:
            self.quota.rebalance(self.pool, self.tables, awake)

    def in_flight(self, model: str) -> int:
        """Requests of `model` waiting or running (a sleep must wait until none are)."""
        q = self.queues[model]
        return len(q.waiting) + len(q.running)

    def sleep_model(self, model: str) -> None:
        """`model` runs no more jobs and its quota returns to the pool at once: ADBS gives it
        out at the next rebalance, a static partition lends it to the awake models now. Its new
        requests wait for `wake_model`.

        Raises ValueError while it has requests running or a job in flight: those hold blocks.
        """
        q = self.queues[model]
        if q.running or q.busy:
            raise ValueError(f"{model}: {len(q.running)} requests running; it cannot sleep")
        self.asleep.add(model)
        if self.quota.adaptive:
            quotas = {n: self.pool.quota(n) for n in self.queues}
            quotas[model] = 0
            self.pool.set_quotas(quotas)
            self._needs_rebalance = True
        else:
            self._rebalance()

    def wake_model(self, model: str) -> None:
        """`model` runs jobs again; ADBS gives it a quota at the next rebalance, a static
        partition its share now (less what borrowers still hold; that comes back as their
        requests end)."""
        self.asleep.discard(model)
        self._needs_rebalance = True
        if not self.quota.adaptive:
            self._rebalance()

    # ---- models joining and leaving (a mesh that changes shape) ----------------------------
    def add_model(self, slot: ModelSlot) -> None:
        """A model joins, asleep: no quota and no jobs until `wake_model`."""
        if slot.name in self.queues:
            raise ValueError(f"{slot.name} is scheduled here already")
        q = ModelQueue(slot)
        self.queues[slot.name] = q
        self._order.append(q)
        self.asleep.add(slot.name)
        self.preemptions_by_model[slot.name] = 0
        self.pool.add_model(slot.name)
        self.tables.layouts[slot.name] = slot.layout
        self._reshaped()

    def remove_model(self, model: str) -> None:
        """An asleep model with no requests leaves; ValueError otherwise."""
        q = self.queues[model]
        if model not in self.asleep or q.has_work():
            raise ValueError(f"{model}: only an asleep model with no requests can be removed")
        if len(self.queues) == 1:
            raise ValueError(f"{model} is the last model here; it cannot be removed")
        del self.queues[model], self.preemptions_by_model[model], self.tables.layouts[model]
        self._order.remove(q)
        self.asleep.discard(model)
        self.pool.remove_model(model)
        self._reshaped()

    def _reshaped(self) -> None:
        """A static partition splits the pool again over the models now here."""
        if not self.quota.adaptive:
            self.quota.initial(self.pool.num_blocks, self.queues)
        self._rebalance()
        self._needs_rebalance = True

    # ---- results -----------------------------------------------------------------------
    @staticmethod
    def _add_prompt_logprobs(req: Request, out: SeqResult) -> None:
        """Keep the prompt logprobs not had yet (a recomputed chunk scores its tokens again)."""
        have = len(req.prompt_logprobs) + 1  # position of the next one wanted (0 has none)
        skip = have - out.prompt_start
        if skip < 0:
            raise AssertionError(
                f"{req.request_id}: prompt logprobs from {out.prompt_start}, expected {have}"
            )
        req.prompt_logprobs.extend(out.prompt_logprobs[skip:])

    def _finish(self, q: ModelQueue, req: Request, reason: FinishReason) -> None:
        self.tables.release(req.request_id)
        self._finished.append(req.request_id)
        if req.status is RequestStatus.RUNNING:
            q.running.remove(req)
            if req in q.prefilling:
                q.prefilling.remove(req)
        elif req.status is RequestStatus.WAITING:
            q.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.pending_finish = None
        del self._requests[req.request_id]
        now = self.clock()
        if reason not in (FinishReason.ABORT, FinishReason.TIMEOUT):  # no measure of service
            q.service.on_finished(now)
        if not q.has_work():
            q.service.on_idle(now)
        if not self.quota.adaptive:  # blocks freed: a share lent out may come back now
            self._needs_rebalance = True

    # ---- introspection -----------------------------------------------------------------
    def stats(self) -> dict[str, ModelStats]:
        return {
            n: ModelStats(
                len(q.waiting),
                len(q.running),
                self.pool.used(n),
                self.pool.quota(n),
                self.preemptions_by_model[n],
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
