"""Scheduler: job formation (ADBS / FCFS), chunked prefill, stops, aborts, errors, preemption."""

from __future__ import annotations

import numpy as np
import pytest

from muxserve.errors import PromptTooLongError, QueueFullError
from muxserve.request import FinishReason, Request, RequestStatus
from muxserve.scheduler.job import JobResult, Phase, SeqResult
from muxserve.scheduler.scheduler import Scheduler
from tests.helpers.scheduler import (
    FakeRunner,
    job_kinds,
    make_layout,
    make_request,
    make_scheduler,
    make_slot,
    result_for,
    run_to_completion,
    step_token,
)

P, D = "prefill", "decode"


def seq_view(job) -> list[tuple[str, tuple[int, ...], int, bool, int]]:
    """(request, tokens, start_pos, sample, step) of each sequence of a job."""
    return [(s.request_id, s.token_ids, s.start_pos, s.sample, s.step) for s in job.seqs]


# ---- job order -------------------------------------------------------------------------------


def test_adbs_prefill_first_then_round_robin() -> None:
    s = make_scheduler([make_slot("a"), make_slot("b"), make_slot("c")], 30)
    for m in "abc":
        s.add_request(make_request(f"{m}0", m, max_tokens=3))
    runner = run_to_completion(s)
    # Full SM shares: one job at a time; prefills of every model before any decode.
    assert job_kinds(runner.jobs) == [
        ("a", P), ("b", P), ("c", P),
        ("a", D), ("b", D), ("c", D),
        ("a", D), ("b", D), ("c", D),
    ]  # fmt: skip
    assert [r.output_token_ids for r in runner.finished.values()] == [
        [step_token("a0", i) for i in range(3)],
        [step_token("b0", i) for i in range(3)],
        [step_token("c0", i) for i in range(3)],
    ]


def test_adbs_new_prefill_goes_before_decodes() -> None:
    s = make_scheduler([make_slot("a"), make_slot("b")], 30)
    s.add_request(make_request("a0", "a", max_tokens=6))
    s.add_request(make_request("b0", "b", max_tokens=6))
    runner = FakeRunner(s)
    for _ in range(3):
        runner.step()
    assert job_kinds(runner.jobs) == [("a", P), ("b", P), ("a", D)]
    s.add_request(make_request("b1", "b", max_tokens=1))
    runner.step()
    assert job_kinds(runner.jobs[3:]) == [("b", P)]
    assert seq_view(runner.jobs[3]) == [("b1", (1000, 1001, 1002, 1003), 0, True, 0)]
    runner.drain()
    assert s.get("b1") is None
    assert runner.finished["b1"].finish_reason is FinishReason.LENGTH


def test_adbs_runs_every_model_at_once_when_shares_fit() -> None:
    slots = [make_slot(m, prefill_share=0.3, decode_share=0.3) for m in "abc"]
    s = make_scheduler(slots, 30)
    for m in "abc":
        s.add_request(make_request(f"{m}0", m, max_tokens=3))
    jobs = s.schedule()
    assert job_kinds(jobs) == [("a", P), ("b", P), ("c", P)]
    assert s.schedule() == []  # every model's only request is in flight
    for job in jobs:
        s.on_job_done(job, result_for(job, step_token))
    # The rotation moves on at every call, the empty one included: c starts the third.
    assert job_kinds(s.schedule()) == [("c", D), ("a", D), ("b", D)]


def test_fcfs_one_job_at_a_time_in_arrival_order() -> None:
    s = make_scheduler([make_slot("a"), make_slot("b")], 30, policy="fcfs")
    s.add_request(make_request("a0", "a", max_tokens=2, arrival=0.0))
    s.add_request(make_request("b0", "b", max_tokens=2, arrival=1.0))
    runner = FakeRunner(s)
    first = runner.schedule()
    assert job_kinds(first) == [("a", P)]
    assert s.schedule() == []  # one job in flight: nothing else
    s.add_request(make_request("a1", "a", max_tokens=2, arrival=2.0))
    assert s.schedule() == []
    runner.complete()
    runner.drain()
    assert job_kinds(runner.jobs) == [("a", P), ("a", D), ("b", P), ("b", D), ("a", P), ("a", D)]
    assert [len(j.seqs) for j in runner.jobs] == [1] * 6
    assert [j.seqs[0].request_id for j in runner.jobs] == ["a0", "a0", "b0", "b0", "a1", "a1"]


def test_fcfs_batches_what_is_waiting_for_the_chosen_model() -> None:
    s = make_scheduler([make_slot("a"), make_slot("b")], 30, policy="fcfs")
    s.add_request(make_request("a0", "a", max_tokens=1, arrival=0.0))
    s.add_request(make_request("b0", "b", max_tokens=1, arrival=1.0))
    s.add_request(make_request("a1", "a", max_tokens=1, arrival=2.0))
    runner = run_to_completion(s)
    assert job_kinds(runner.jobs) == [("a", P), ("b", P)]
    assert [[q.request_id for q in j.seqs] for j in runner.jobs] == [["a0", "a1"], ["b0"]]


# ---- prefill and batching --------------------------------------------------------------------


def test_prefill_budget_chunks_a_long_prompt() -> None:
    s = make_scheduler([make_slot("a")], 16, prefill_token_budget=4)
    s.add_request(make_request("r", prompt=10, max_tokens=2))
    runner = FakeRunner(s)
    runner.schedule()
    job = runner.jobs[0]
    assert job.phase is Phase.PREFILL
    np.testing.assert_array_equal(job.seqs[0].block_table.ravel(), [0, 1, 2])  # the whole prompt
    assert seq_view(job) == [("r", (1000, 1001, 1002, 1003), 0, False, 0)]
    changed = s.on_job_done(job, result_for(job, step_token))
    runner.in_flight.clear()
    assert changed == []  # no token yet
    req = s.get("r")
    assert req is not None
    assert (req.num_computed_tokens, req.output_token_ids) == (4, [])
    runner.drain()
    assert [seq_view(j) for j in runner.jobs] == [
        [("r", (1000, 1001, 1002, 1003), 0, False, 0)],
        [("r", (1004, 1005, 1006, 1007), 4, False, 0)],
        [("r", (1008, 1009), 8, True, 0)],
        [("r", (step_token("r", 0),), 10, True, 1)],
    ]
    assert runner.finished["r"].output_token_ids == [step_token("r", i) for i in range(2)]


def test_prefill_budget_is_shared_by_the_batch() -> None:
    s = make_scheduler([make_slot("a")], 16, prefill_token_budget=6)
    s.add_request(make_request("r0", prompt=4, max_tokens=1))
    s.add_request(make_request("r1", prompt=4, max_tokens=1))
    runner = run_to_completion(s)
    assert [seq_view(j) for j in runner.jobs] == [
        [("r0", (1000, 1001, 1002, 1003), 0, True, 0), ("r1", (1000, 1001), 0, False, 0)],
        [("r1", (1002, 1003), 2, True, 0)],
    ]


def test_max_batch_size() -> None:
    s = make_scheduler([make_slot("a")], 16, max_batch_size=2)
    for i in range(3):
        s.add_request(make_request(f"r{i}", max_tokens=2, arrival=i))
    runner = run_to_completion(s)
    assert [(j.phase.value, [q.request_id for q in j.seqs]) for j in runner.jobs] == [
        (P, ["r0", "r1"]),
        (P, ["r2"]),
        (D, ["r0", "r1"]),
        (D, ["r2"]),
    ]


# ---- stopping --------------------------------------------------------------------------------


def finish_of(token_fn, **kw) -> tuple[FinishReason | None, list[int]]:
    s = make_scheduler([make_slot("a", max_model_len=kw.pop("max_model_len", 64))], 32)
    s.add_request(make_request("r", **kw))
    runner = run_to_completion(s, token_fn)
    req = runner.finished["r"]
    assert s.pool.num_free == 32
    return req.finish_reason, req.output_token_ids


def counting(request_id: str, step: int) -> int:
    return 100 + step


class EndAt:
    """An output check (as the engine's stop strings and grammars) that ends a request at its
    `n`-th token, and records what it was asked."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.asked: list[tuple[int, FinishReason | None]] = []

    def check(self, req: Request, reason: FinishReason | None) -> FinishReason | None:
        self.asked.append((len(req.output_token_ids), reason))
        if reason is None and len(req.output_token_ids) == self.n:
            return FinishReason.STOP
        return reason


def test_the_output_check_is_asked_where_ids_and_lengths_decide() -> None:
    """One place decides a request's end: the check hears the ids' and lengths' verdict on
    every token, and its answer is the request's end."""
    s = make_scheduler([make_slot("a")], 32)
    stopped, long = make_request("s", max_tokens=8), make_request("l", max_tokens=2)
    stopped.output_check, long.output_check = EndAt(3), EndAt(99)
    s.add_request(stopped)
    s.add_request(long)
    run_to_completion(s, counting)
    assert (stopped.finish_reason, stopped.output_token_ids) == (FinishReason.STOP, [100, 101, 102])
    assert stopped.output_check.asked == [(1, None), (2, None), (3, None)]
    assert (long.finish_reason, long.output_check.asked) == (
        FinishReason.LENGTH,
        [(1, None), (2, FinishReason.LENGTH)],
    )
    assert s.pool.num_free == 32


def test_stop_on_eos() -> None:
    assert finish_of(counting, max_tokens=8, eos={102}) == (FinishReason.STOP, [100, 101, 102])


def test_ignore_eos() -> None:
    assert finish_of(counting, max_tokens=4, eos={101}, ignore_eos=True) == (
        FinishReason.LENGTH,
        [100, 101, 102, 103],
    )


def test_stop_token_ids() -> None:
    assert finish_of(counting, max_tokens=8, stop_token_ids=(7, 101)) == (
        FinishReason.STOP,
        [100, 101],
    )


def test_stop_token_ids_apply_with_ignore_eos() -> None:
    assert finish_of(counting, max_tokens=8, eos={100}, ignore_eos=True, stop_token_ids=(101,)) == (
        FinishReason.STOP,
        [100, 101],
    )


def test_eos_on_the_first_token() -> None:
    assert finish_of(counting, max_tokens=8, eos={100}) == (FinishReason.STOP, [100])


def test_max_tokens() -> None:
    assert finish_of(counting, max_tokens=3) == (FinishReason.LENGTH, [100, 101, 102])


def test_max_tokens_one_finishes_at_prefill() -> None:
    assert finish_of(counting, max_tokens=1) == (FinishReason.LENGTH, [100])


def test_max_model_len() -> None:
    reason, out = finish_of(counting, prompt=6, max_tokens=4, max_model_len=10)
    assert (reason, out) == (FinishReason.LENGTH, [100, 101, 102, 103])


# ---- abort, finish, errors -------------------------------------------------------------------


def test_abort_waiting() -> None:
    s = make_scheduler([make_slot("a")], 16)
    s.add_request(make_request("r0"))
    s.add_request(make_request("r1"))
    req = s.abort("r0")
    assert req is not None
    assert (req.status, req.finish_reason) == (RequestStatus.FINISHED, FinishReason.ABORT)
    assert s.get("r0") is None
    assert s.abort("r0") is None
    assert s.abort("nobody") is None
    assert s.stats()["a"].waiting == 1
    s.check_integrity()
    runner = run_to_completion(s)
    assert runner.jobs[0].seqs[0].request_id == "r1"
    assert "r0" not in {q.request_id for j in runner.jobs for q in j.seqs}


def test_abort_running_frees_at_once() -> None:
    s = make_scheduler([make_slot("a")], 16)
    s.add_request(make_request("r0", max_tokens=4))
    runner = FakeRunner(s)
    runner.step()  # prefill done: r0 is running and holds a block
    assert s.pool.used("a") == 1
    req = s.abort("r0")
    assert req is not None and req.finish_reason is FinishReason.ABORT
    assert req.output_token_ids == [step_token("r0", 0)]
    assert s.pool.num_free == 16
    assert not s.has_work()
    s.check_integrity()


def test_abort_in_flight_frees_when_the_job_returns() -> None:
    s = make_scheduler([make_slot("a")], 16)
    s.add_request(make_request("r0", max_tokens=4))
    s.add_request(make_request("r1", max_tokens=1))
    (job,) = s.schedule()
    req = s.abort("r0")
    assert req is not None
    assert (req.pending_finish, req.status, req.finish_reason) == (
        FinishReason.ABORT,
        RequestStatus.RUNNING,
        None,
    )
    assert s.pool.used("a") == 2  # still in the job's hands
    s.check_integrity()
    changed = s.on_job_done(job, result_for(job, step_token))
    assert [(r.request_id, r.finish_reason) for r in changed] == [
        ("r0", FinishReason.ABORT),
        ("r1", FinishReason.LENGTH),
    ]
    assert req.output_token_ids == []  # the token sampled after the abort is dropped
    assert s.pool.num_free == 16
    assert not s.has_work()
    s.check_integrity()


def test_finish_stop_for_a_stop_string() -> None:
    s = make_scheduler([make_slot("a")], 16)
    s.add_request(make_request("r0", max_tokens=8))
    runner = FakeRunner(s)
    runner.step()
    runner.step()
    req = s.finish("r0", FinishReason.STOP)
    assert req is not None
    assert req.finish_reason is FinishReason.STOP
    assert req.output_token_ids == [step_token("r0", 0), step_token("r0", 1)]
    assert s.pool.num_free == 16
    assert s.finish("r0", FinishReason.STOP) is None


def test_job_error_finishes_its_requests() -> None:
    s = make_scheduler([make_slot("a", prefill_share=0.5), make_slot("b", prefill_share=0.5)], 16)
    s.add_request(make_request("a0", "a", max_tokens=3))
    s.add_request(make_request("a1", "a", max_tokens=3))
    s.add_request(make_request("b0", "b", max_tokens=3))
    job_a, job_b = s.schedule()
    assert s.pool.snapshot()["a"][0] == 2
    changed = s.on_job_done(job_a, JobResult(job_a.job_id, (), error="CUDA error"))
    assert [(r.request_id, r.finish_reason, r.output_token_ids) for r in changed] == [
        ("a0", FinishReason.ERROR, []),
        ("a1", FinishReason.ERROR, []),
    ]
    assert s.pool.used("a") == 0
    s.check_integrity()
    s.on_job_done(job_b, result_for(job_b, step_token))
    runner = run_to_completion(s)
    assert runner.finished["b0"].finish_reason is FinishReason.LENGTH
    assert runner.finished["b0"].output_token_ids == [step_token("b0", i) for i in range(3)]
    assert s.pool.num_free == 16


def test_abort_in_flight_wins_over_a_job_error() -> None:
    s = make_scheduler([make_slot("a")], 16)
    s.add_request(make_request("r0"))
    (job,) = s.schedule()
    s.abort("r0")
    (req,) = s.on_job_done(job, JobResult(job.job_id, (), error="boom"))
    assert req.finish_reason is FinishReason.ABORT


def test_logprobs_recorded_when_asked() -> None:
    s = make_scheduler([make_slot("a")], 16)
    s.add_request(make_request("r0", max_tokens=1, logprobs=1))
    s.add_request(make_request("r1", max_tokens=1))
    (job,) = s.schedule()
    out = tuple(SeqResult(q.request_id, 7, -0.5, ((7, -0.5), (8, -1.5))) for q in job.seqs)
    r0, r1 = s.on_job_done(job, JobResult(job.job_id, out))
    assert [(t.token_id, t.logprob, t.top) for t in r0.output_logprobs] == [
        (7, -0.5, ((7, -0.5), (8, -1.5)))
    ]
    assert r1.output_logprobs == []


# ---- preemption ------------------------------------------------------------------------------


def three_requests(num_blocks: int) -> Scheduler:
    s = make_scheduler([make_slot("a")], num_blocks)
    for i in range(3):
        s.add_request(make_request(f"r{i}", prompt=4, max_tokens=8, arrival=float(i)))
    return s


def test_preemption_takes_the_newest_and_recomputes() -> None:
    s = three_requests(6)  # 3 requests of 12 tokens need 9 blocks: r2 must make way
    runner = run_to_completion(s)
    assert s.num_preemptions == 1
    assert {r: q.num_preemptions for r, q in runner.finished.items()} == {"r0": 0, "r1": 0, "r2": 1}
    views = [seq_view(j) for j in runner.jobs]
    assert [len(v) for v in views] == [3, 3, 3, 3, 3, 2, 2, 2, 1, 1, 1]
    # r0 crossing into its third block evicts r2 (5 tokens out); r0 and r1 take its blocks.
    np.testing.assert_array_equal(runner.jobs[5].seqs[0].block_table.ravel(), [0, 3, 2])
    np.testing.assert_array_equal(runner.jobs[5].seqs[1].block_table.ravel(), [1, 4, 5])
    # Re-admitted, r2 recomputes its prompt and the 5 tokens it had, and samples step 5.
    r2_out = [step_token("r2", i) for i in range(5)]
    assert views[8] == [("r2", (1000, 1001, 1002, 1003, *r2_out), 0, True, 5)]
    assert views[9] == [("r2", (step_token("r2", 5),), 9, True, 6)]
    # the scheduler says whose block tables are new: the first admission, and r2's again
    assert [j.fresh for j in runner.jobs] == [("r0", "r1", "r2"), *[()] * 7, ("r2",), (), ()]


def test_each_round_names_the_requests_finished_before_it() -> None:
    s = make_scheduler([make_slot("a")], 16)
    for rid, n in (("r0", 1), ("r1", 3), ("r2", 3)):
        s.add_request(make_request(rid, max_tokens=n))
    runner = FakeRunner(s)
    runner.step()  # one prefill of all three: r0 ends with its first token
    assert s.finished_before_round == ()
    s.abort("r2")  # between rounds, as a client's disconnect
    runner.step()  # r1's second token
    assert s.finished_before_round == ("r0", "r2")
    runner.step()  # r1's third and last token
    assert s.finished_before_round == ()  # said once
    s.schedule()
    assert s.finished_before_round == ("r1",)
    assert not s.has_work()


def test_preemption_gives_the_same_tokens_as_no_pressure() -> None:
    calm = run_to_completion(three_requests(64))
    tight = three_requests(6)
    pressed = run_to_completion(tight)
    assert calm.scheduler.num_preemptions == 0
    assert tight.num_preemptions == 1
    assert {r: q.output_token_ids for r, q in pressed.finished.items()} == {
        r: q.output_token_ids for r, q in calm.finished.items()
    }
    assert all(q.finish_reason is FinishReason.LENGTH for q in pressed.finished.values())


def test_heavy_pressure_same_tokens_across_models() -> None:
    layouts = {
        "a": make_layout(),
        "b": make_layout(num_layers=2, head_dim=16),  # 2 tokens per block, 2 blocks per logical
    }

    def build(num_blocks: int) -> Scheduler:
        s = make_scheduler(
            [make_slot(m, layout=lo) for m, lo in layouts.items()], num_blocks, kv_mode="unified"
        )
        for i in range(6):
            m = "ab"[i % 2]
            s.add_request(make_request(f"{m}{i}", m, prompt=3 + i, max_tokens=6, arrival=i))
        return s

    calm = run_to_completion(build(200))
    tight_s = build(18)  # the largest request needs 14; the admission reserve still leaves churn
    tight = run_to_completion(tight_s)
    assert tight_s.num_preemptions > 0
    assert {r: q.output_token_ids for r, q in tight.finished.items()} == {
        r: q.output_token_ids for r, q in calm.finished.items()
    }


# ---- SM admission ----------------------------------------------------------------------------


def test_sm_admission_one_job_when_two_do_not_fit() -> None:
    slots = [make_slot(m, prefill_share=0.6, decode_share=0.6) for m in "ab"]
    s = make_scheduler(slots, 16, sm_overload=0.1)
    s.add_request(make_request("a0", "a", max_tokens=2))
    s.add_request(make_request("b0", "b", max_tokens=2))
    runner = FakeRunner(s)
    assert job_kinds(runner.schedule()) == [("a", P)]
    assert s.schedule() == []  # 0.6 + 0.6 > 1.1
    runner.drain()
    assert job_kinds(runner.jobs) == [("a", P), ("b", P), ("a", D), ("b", D)]
    assert [j.sm_share for j in runner.jobs] == [0.6] * 4


def test_sm_admission_within_the_overload() -> None:
    slots = [make_slot(m, prefill_share=0.5, decode_share=0.5) for m in "abc"]
    s = make_scheduler(slots, 16, sm_overload=0.1)
    for m in "abc":
        s.add_request(make_request(f"{m}0", m, max_tokens=2))
    first = s.schedule()
    assert job_kinds(first) == [("a", P), ("b", P)]  # 1.0 fits in 1.1; a third would be 1.5
    s.on_job_done(first[0], result_for(first[0], step_token))
    assert job_kinds(s.schedule()) == [("c", P)]  # b (0.5) + c (0.5); a's decode would be 1.5


def test_sm_admission_shares_that_exactly_fill_the_limit_fit() -> None:
    # 0.01 + 0.26 + 0.93 is 1.2000000000000002 in floats; they exactly fill 100% + 20%
    shares = {"a": 0.01, "b": 0.26, "c": 0.93}
    slots = [make_slot(m, prefill_share=x, decode_share=x) for m, x in shares.items()]
    s = make_scheduler(slots, 16, sm_overload=0.2)
    for m in shares:
        s.add_request(make_request(f"{m}0", m, max_tokens=2))
    assert job_kinds(s.schedule()) == [("a", P), ("b", P), ("c", P)]


def test_a_job_always_starts_on_an_idle_device() -> None:
    s = make_scheduler([make_slot("a", prefill_share=1.0)], 16, sm_overload=0.0)
    s.add_request(make_request("a0"))
    assert job_kinds(s.schedule()) == [("a", P)]


# ---- admission errors ------------------------------------------------------------------------


def assert_rejected(s: Scheduler, req, error: type[Exception], param: str, match: str) -> None:
    before = (s.pool.snapshot(), s.pool.num_free, s.stats())
    with pytest.raises(error, match=match) as info:
        s.add_request(req)
    assert info.value.param == param  # type: ignore[attr-defined]
    assert (s.pool.snapshot(), s.pool.num_free, s.stats()) == before
    assert s.get(req.request_id) is None
    s.check_integrity()


def test_prompt_as_long_as_the_context() -> None:
    s = make_scheduler([make_slot("a", max_model_len=8)], 16)
    assert_rejected(
        s, make_request("r", prompt=8, max_tokens=1), PromptTooLongError, "prompt", "has 8 tokens"
    )


def test_prompt_plus_max_tokens_over_the_context() -> None:
    s = make_scheduler([make_slot("a", max_model_len=8)], 16)
    assert_rejected(
        s,
        make_request("r", prompt=4, max_tokens=5),
        PromptTooLongError,
        "max_tokens",
        "context is 8 tokens, but 9 were asked",
    )
    s.add_request(make_request("ok", prompt=4, max_tokens=4))  # exactly the context fits


def test_more_blocks_than_a_static_share() -> None:
    slots = [make_slot("a"), make_slot("b")]
    static = make_scheduler(slots, 8, kv_mode="static")  # 4 blocks (16 tokens) each
    assert_rejected(
        static,
        make_request("r", prompt=10, max_tokens=8),
        PromptTooLongError,
        "max_tokens",
        r"need 5 KV blocks; its share of the pool holds 4 blocks \(16 tokens\)",
    )
    static.add_request(make_request("fits", prompt=10, max_tokens=6))
    unified = make_scheduler(slots, 8)  # any model may grow to the whole pool
    unified.add_request(make_request("r", prompt=10, max_tokens=8))
    assert_rejected(
        unified,
        make_request("big", prompt=20, max_tokens=16),
        PromptTooLongError,
        "max_tokens",
        r"need 9 KV blocks; its share of the pool holds 8 blocks \(32 tokens\)",
    )


def test_queue_full() -> None:
    s = make_scheduler([make_slot("a", max_waiting=2)], 16)
    s.add_request(make_request("r0"))
    s.add_request(make_request("r1"))
    assert_rejected(s, make_request("r2"), QueueFullError, "model", "2 requests already waiting")
    FakeRunner(s).step()  # both admitted: the queue has room again
    s.add_request(make_request("r2"))


def test_duplicate_request_id() -> None:
    s = make_scheduler([make_slot("a")], 16)
    s.add_request(make_request("r0"))
    with pytest.raises(ValueError, match="duplicate request id 'r0'"):
        s.add_request(make_request("r0"))


def test_needs_a_model() -> None:
    with pytest.raises(ValueError, match="at least one model"):
        make_scheduler([], 16)


# ---- liveness --------------------------------------------------------------------------------


def test_blocked_model_gets_blocks_without_an_idle_step() -> None:
    """A model whose quota is too small for its next request gets it from the idle pool at once."""
    s = make_scheduler([make_slot("a", rate=10.0), make_slot("b")], 12)
    assert s.pool.snapshot() == {"a": (0, 11), "b": (0, 1)}
    s.add_request(make_request("b0", "b", prompt=20, max_tokens=4))  # 6 blocks
    assert job_kinds(s.schedule()) == [("b", P)]


def test_two_models_each_needing_most_of_the_pool_both_finish() -> None:
    s = make_scheduler([make_slot("a"), make_slot("b")], 12)  # 6 + 6 blocks at first
    s.add_request(make_request("a0", "a", prompt=30, max_tokens=10, arrival=0.0))  # 10 blocks
    s.add_request(make_request("b0", "b", prompt=30, max_tokens=10, arrival=1.0))  # 10 blocks
    runner = run_to_completion(s)
    assert job_kinds(runner.jobs)[0] == ("a", P)  # the older request goes first
    assert {r: q.finish_reason for r, q in runner.finished.items()} == {
        "a0": FinishReason.LENGTH,
        "b0": FinishReason.LENGTH,
    }
