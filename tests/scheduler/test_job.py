"""The job seam: a result's consistency with its job, checked where it is applied."""

from __future__ import annotations

import pytest

from muxserve.scheduler.job import JobResult, SeqResult
from tests.helpers.scheduler import make_request, make_scheduler, make_slot


def test_retry_needs_an_error() -> None:
    with pytest.raises(ValueError, match="job 3: retry=True needs the error"):
        JobResult(3, (), retry=True)
    assert JobResult(3, (), "worker died", retry=True).retry


def test_outputs_must_match_the_sequences() -> None:
    s = make_scheduler([make_slot("a")], 16)
    s.add_request(make_request("r1"))
    s.add_request(make_request("r2"))
    (job,) = s.schedule()
    short = JobResult(job.job_id, (SeqResult("r1", 7),))
    with pytest.raises(ValueError, match=r"job 0 \(a\): 1 outputs for 2 sequences"):
        s.on_job_done(job, short)
    # nothing was applied: the job is still in flight, its requests wait for its results
    assert [r.num_computed_tokens for r in s.queues["a"].running] == [0, 0]
    assert s.jobs_in_flight == 1 and s.schedule() == []
    whole = JobResult(job.job_id, (SeqResult("r1", 7), SeqResult("r2", 8)))
    assert [r.request_id for r in s.on_job_done(job, whole)] == ["r1", "r2"]
    assert s.jobs_in_flight == 0
    assert [r.num_computed_tokens for r in s.queues["a"].running] == [4, 4]
