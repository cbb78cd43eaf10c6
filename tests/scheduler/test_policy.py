"""Job policies: which (model, phase) to try next under ADBS and FCFS."""

from __future__ import annotations

from muxserve.request import Request, RequestStatus
from muxserve.scheduler.job import Phase
from muxserve.scheduler.model_slot import ModelQueue
from muxserve.scheduler.policy import AdbsPolicy, FcfsPolicy
from tests.helpers.scheduler import make_request, make_slot

P, D = Phase.PREFILL, Phase.DECODE


def names(cands: list[tuple[ModelQueue, Phase]]) -> list[tuple[str, str]]:
    return [(q.name, p.value) for q, p in cands]


def running(req: Request, *, decoding: bool, in_flight: bool = False) -> Request:
    req.status = RequestStatus.RUNNING
    if decoding:
        req.output_token_ids.append(7)
        req.num_computed_tokens = req.num_prompt_tokens
    req.in_flight = in_flight
    return req


def test_adbs_prefills_first_and_rotates() -> None:
    qs = [ModelQueue(make_slot(m)) for m in "abc"]
    policy = AdbsPolicy()
    assert policy.max_jobs_in_flight is None
    expected = [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]
    for order in expected:
        cands = names(policy.candidates(qs, jobs_in_flight=0))
        assert cands == [(m, "prefill") for m in order] + [(m, "decode") for m in order]


def test_adbs_rotates_whatever_is_in_flight() -> None:
    qs = [ModelQueue(make_slot(m)) for m in "ab"]
    policy = AdbsPolicy()
    assert names(policy.candidates(qs, 3))[0] == ("a", "prefill")
    assert names(policy.candidates(qs, 0))[0] == ("b", "prefill")


def test_fcfs_oldest_first() -> None:
    a, b = ModelQueue(make_slot("a")), ModelQueue(make_slot("b"))
    a.waiting.append(make_request("a2", "a", arrival=2.0))
    a.running.append(running(make_request("a0", "a", arrival=0.5), decoding=True))
    b.running.append(running(make_request("b1", "b", arrival=1.0), decoding=False))  # chunking
    b.waiting.append(make_request("b3", "b", arrival=3.0))
    policy = FcfsPolicy()
    assert policy.max_jobs_in_flight == 1
    assert names(policy.candidates([a, b], 0)) == [
        ("a", "decode"),  # a0, 0.5
        ("b", "prefill"),  # b1, 1.0 (b3 is later)
        ("a", "prefill"),  # a2, 2.0
    ]


def test_fcfs_nothing_while_a_job_runs() -> None:
    a = ModelQueue(make_slot("a"))
    a.waiting.append(make_request("a0", "a"))
    assert FcfsPolicy().candidates([a], jobs_in_flight=1) == []


def test_fcfs_skips_requests_in_flight_and_breaks_ties_by_model_then_prefill() -> None:
    a, b = ModelQueue(make_slot("a")), ModelQueue(make_slot("b"))
    a.running.append(running(make_request("a0", "a", arrival=0.0), decoding=True, in_flight=True))
    a.running.append(running(make_request("a1", "a", arrival=1.0), decoding=True))
    a.waiting.append(make_request("a2", "a", arrival=1.0))
    b.waiting.append(make_request("b0", "b", arrival=1.0))
    assert names(FcfsPolicy().candidates([a, b], 0)) == [
        ("a", "prefill"),
        ("a", "decode"),
        ("b", "prefill"),
    ]


def test_fcfs_empty_queues() -> None:
    assert FcfsPolicy().candidates([ModelQueue(make_slot("a"))], 0) == []


def test_requeue_keeps_arrival_order() -> None:
    q = ModelQueue(make_slot("a"))
    for i in (0, 2, 4):
        q.waiting.append(make_request(f"r{i}", arrival=float(i)))
    q.requeue(make_request("r3", arrival=3.0))
    q.requeue(make_request("r2b", arrival=2.0))  # after an earlier arrival with the same time
    q.requeue(make_request("r9", arrival=9.0))
    assert [r.request_id for r in q.waiting] == ["r0", "r2", "r2b", "r3", "r4", "r9"]
    assert q.has_work()
    assert not ModelQueue(make_slot("a")).has_work()


def test_slot_share_by_phase() -> None:
    slot = make_slot("a", prefill_share=0.7, decode_share=0.2)
    assert (P.share(slot.sm_share), D.share(slot.sm_share)) == (0.7, 0.2)
