"""A job lost with its worker (`JobResult.retry`): its requests are recomputed, a few times."""

from __future__ import annotations

from muxserve.executor.watchdog import JobDeadline
from muxserve.request import FinishReason, RequestStatus
from muxserve.scheduler.job import Job, JobResult, Phase
from muxserve.scheduler.outcomes import MAX_RETRIES
from tests.helpers.scheduler import make_request, make_scheduler, make_slot


def lose(job: Job) -> JobResult:
    return JobResult(job.job_id, (), "a/prefill: worker died; recomputed", retry=True)


def test_a_lost_job_requeues_its_requests_until_the_retry_limit() -> None:
    s = make_scheduler([make_slot("a")], 16)
    s.add_request(make_request("r1", prompt=6))
    s.add_request(make_request("r2", prompt=3))
    for attempt in range(1, MAX_RETRIES + 1):
        (job,) = s.schedule()
        assert (job.phase, [q.request_id for q in job.seqs]) == (Phase.PREFILL, ["r1", "r2"])
        assert s.on_job_done(job, lose(job)) == []  # nothing to tell the client yet
        reqs = [s.queues["a"].waiting[i] for i in range(2)]
        assert [r.request_id for r in reqs] == ["r1", "r2"]  # arrival order kept
        assert [(r.status, r.num_retries, r.num_computed_tokens) for r in reqs] == [
            (RequestStatus.WAITING, attempt, 0)
        ] * 2
        assert s.pool.num_free == 16 and s.num_preemptions == 2 * attempt
        s.check_integrity()
    (job,) = s.schedule()
    failed = s.on_job_done(job, lose(job))  # the limit: these may be what kills the worker
    assert [(r.request_id, r.finish_reason) for r in failed] == [
        ("r1", FinishReason.ERROR),
        ("r2", FinishReason.ERROR),
    ]
    assert not s.has_work() and s.pool.num_free == 16


def test_an_error_without_retry_fails_at_once() -> None:
    s = make_scheduler([make_slot("a")], 16)
    s.add_request(make_request("r1"))
    (job,) = s.schedule()
    failed = s.on_job_done(job, JobResult(job.job_id, (), "bad input"))
    assert [(r.request_id, r.finish_reason, r.num_retries) for r in failed] == [
        ("r1", FinishReason.ERROR, 0)
    ]


def test_job_deadline_grows_with_the_job() -> None:
    s = make_scheduler([make_slot("a")], 16)
    s.add_request(make_request("r1", prompt=7))
    (job,) = s.schedule()
    assert JobDeadline(2.0, 0.5).of(job) == 2.0 + 0.5 * 7
    assert JobDeadline().of(job) == 60.0 + 0.01 * 7
    assert JobDeadline(2.0, 0.5).of(job, first=True) == 4.0 + 0.5 * 7  # a fresh worker's
