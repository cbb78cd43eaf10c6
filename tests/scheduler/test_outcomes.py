"""Applying job results and ending requests on their own: the index, the queues, the blocks and
the list of those ended each round. Torch-free, exact values."""

from __future__ import annotations

from muxserve.request import FinishReason, Request, RequestStatus
from muxserve.scheduler.batcher import Batcher
from muxserve.scheduler.job import Job, JobResult, Phase, SeqResult
from muxserve.scheduler.model_set import ModelSet
from muxserve.scheduler.outcomes import MAX_RETRIES, Outcomes
from muxserve.scheduler.quota import AdaptiveQuota, QuotaPolicy, StaticQuota
from tests.helpers.scheduler import make_request, make_slot


class Parts:
    """Model a over 16 blocks: its queue, a batcher that forms its jobs, and its outcomes."""

    def __init__(self, quota: QuotaPolicy) -> None:
        self.asked: list[str] = []  # each rebalance asked for the next step
        later = self.later
        self.models = ModelSet([make_slot("a")], 16, quota, asleep=(), rebalance_later=later)
        self.q = self.models.queues["a"]
        self.requests: dict[str, Request] = {}
        self.batcher = Batcher(
            self.models.pool,
            self.models.tables,
            prefill_token_budget=64,
            max_batch_size=8,
            rebalance=self.models.rebalance,
            on_short=later,
        )
        self.done = Outcomes(
            self.requests,
            self.models.tables,
            self.batcher,
            adaptive=quota.adaptive,
            clock=lambda: 5.0,
            rebalance_later=later,
        )

    def later(self) -> None:
        self.asked.append("later")

    def add(self, rid: str, **kw: object) -> Request:
        req = make_request(rid, **kw)  # type: ignore[arg-type]
        self.requests[rid] = req
        self.q.waiting.append(req)
        return req

    def prefill(self) -> Job:
        seqs, admitted = self.batcher.prefill(self.q)
        return Job(0, "a", Phase.PREFILL, tuple(seqs), 1.0, tuple(admitted))


def test_a_prefill_samples_the_first_token_and_max_tokens_one_ends_it() -> None:
    p = Parts(AdaptiveQuota())
    r0, r1 = p.add("r0", max_tokens=1), p.add("r1", max_tokens=3)
    job = p.prefill()
    changed = p.done.apply(p.q, job, JobResult(0, (SeqResult("r0", 7), SeqResult("r1", 8))))
    assert changed == [r0, r1]
    assert (r0.status, r0.finish_reason, r0.output_token_ids) == (
        RequestStatus.FINISHED,
        FinishReason.LENGTH,
        [7],
    )
    assert (r1.status, r1.output_token_ids, r1.num_computed_tokens) == (
        RequestStatus.RUNNING,
        [8],
        4,
    )
    assert list(p.requests) == ["r1"] and p.q.running == [r1] and p.q.prefilling == []
    assert p.done.take_finished() == ("r0",) and p.done.take_finished() == ()
    assert p.asked == []  # adaptive: nothing lent out to take back


def test_finishing_a_waiting_request_under_a_static_partition_asks_a_rebalance() -> None:
    p = Parts(StaticQuota())
    req = p.add("r0")
    p.done.finish(p.q, req, FinishReason.ABORT)
    assert (req.status, req.finish_reason, p.requests, list(p.q.waiting)) == (
        RequestStatus.FINISHED,
        FinishReason.ABORT,
        {},
        [],
    )
    assert p.asked == ["later"] and p.done.take_finished() == ("r0",)


def test_a_lost_job_is_computed_again_then_its_requests_fail() -> None:
    p = Parts(AdaptiveQuota())
    req = p.add("r0")
    for attempt in range(1, MAX_RETRIES + 1):
        assert p.done.failed(p.q, p.prefill(), retry=True) == []
        assert (req.num_retries, req.status, p.models.pool.used("a")) == (
            attempt,
            RequestStatus.WAITING,
            0,
        )
    assert p.done.failed(p.q, p.prefill(), retry=True) == [req]
    assert (req.finish_reason, p.requests, p.models.pool.used("a")) == (FinishReason.ERROR, {}, 0)
