"""What the scheduler sends with each step for the sampling controls and prompt logprobs (issue
12): chunks to score and the prompt token after each, the token history once per admission,
the stop tokens banned before min_tokens, max_tokens 0; prompt logprobs kept once across a
recompute."""

from __future__ import annotations

from muxserve.request import FinishReason, TokenLogprobs
from muxserve.scheduler.job import Job, JobResult, Phase, SeqResult
from tests.helpers.scheduler import make_request, make_scheduler, make_slot


def scores(job: Job) -> JobResult:
    """A runner's answer: for each chunk that scores, logprob -p of the token at position p."""
    outs = []
    for s in job.seqs:
        prompt: tuple[TokenLogprobs, ...] = ()
        if s.prompt_len:
            targets = [*s.token_ids[1:], *(() if s.next_token is None else (s.next_token,))]
            first = s.start_pos + 1
            n = min(len(s.token_ids), s.prompt_len - s.start_pos - 1)
            prompt = tuple(
                TokenLogprobs(t, -float(first + i), ()) for i, t in enumerate(targets[:n])
            )
        token = 7 if s.sample else None
        outs.append(
            SeqResult(s.request_id, token, prompt_logprobs=prompt, prompt_start=s.start_pos + 1)
        )
    return JobResult(job.job_id, tuple(outs))


def run(sched, jobs_seen: list[Job], steps: int = 50) -> None:
    for _ in range(steps):
        jobs = sched.schedule()
        jobs_seen += jobs
        for job in jobs:
            sched.on_job_done(job, scores(job))
        sched.check_integrity()
        if not sched.has_work():
            return
    raise AssertionError("no progress")


def test_chunks_score_the_prompt_with_the_next_token_and_max_tokens_0_ends_at_the_prefill():
    sched = make_scheduler([make_slot()], 64, prefill_token_budget=4)
    req = make_request("r", prompt=10, max_tokens=0, prompt_logprobs=2)
    sched.add_request(req)
    jobs: list[Job] = []
    run(sched, jobs)
    chunks = [
        (s.start_pos, s.token_ids, s.prompt_len, s.next_token, s.sample)
        for j in jobs
        for s in j.seqs
    ]
    assert chunks == [
        (0, (1000, 1001, 1002, 1003), 10, 1004, False),
        (4, (1004, 1005, 1006, 1007), 10, 1008, False),
        (8, (1008, 1009), 10, None, False),  # the last chunk: nothing to sample
    ]
    assert (req.finish_reason, req.output_token_ids) == (FinishReason.LENGTH, [])
    assert [(lp.token_id, lp.logprob) for lp in req.prompt_logprobs] == [
        (1000 + p, -float(p)) for p in range(1, 10)
    ]


def test_a_recomputed_prefill_keeps_each_prompt_logprob_once():
    sched = make_scheduler([make_slot()], 64, prefill_token_budget=4)
    req = make_request("r", prompt=10, max_tokens=3, prompt_logprobs=0)
    sched.add_request(req)
    [job] = sched.schedule()
    sched.on_job_done(job, scores(job))  # positions 1..4 scored
    q = sched.queues["a"]
    sched.batcher.preempt(q, req)  # as making room does to a victim: it starts over at position 0
    jobs: list[Job] = []
    run(sched, jobs)
    assert jobs[0].seqs[0].start_pos == 0 and jobs[0].seqs[0].prompt_len == 10  # re-scored
    assert [lp.token_id for lp in req.prompt_logprobs] == list(range(1001, 1010))
    decode = [s for j in jobs if j.phase is Phase.DECODE for s in j.seqs]
    assert all(s.prompt_len == 0 for s in decode)  # complete: decode steps score nothing


def test_history_goes_once_per_admission_with_the_first_decode_step():
    sched = make_scheduler([make_slot()], 64)
    req = make_request("r", prompt=3, max_tokens=4, presence_penalty=1.0)
    plain = make_request("p", prompt=3, max_tokens=4)
    sched.add_request(req)
    sched.add_request(plain)
    jobs: list[Job] = []
    run(sched, jobs)
    sent = [
        (s.request_id, s.step, s.history) for j in jobs for s in j.seqs if j.phase is Phase.DECODE
    ]
    assert sent == [
        ("r", 1, (1000, 1001, 1002)),  # prompt; the first output token is this step's input
        ("p", 1, None),
        ("r", 2, None),
        ("p", 2, None),
        ("r", 3, None),
        ("p", 3, None),
    ]


def test_stop_tokens_are_banned_until_min_tokens():
    sched = make_scheduler([make_slot()], 64)
    req = make_request("r", prompt=2, max_tokens=5, eos=[2], min_tokens=2, stop_token_ids=(9,))
    sched.add_request(req)
    jobs: list[Job] = []
    run(sched, jobs)
    banned = [(s.step, s.banned) for j in jobs for s in j.seqs if s.sample]
    assert banned == [
        (0, frozenset({2, 9})),
        (1, frozenset({2, 9})),
        (2, frozenset()),
        (3, frozenset()),
        (4, frozenset()),
    ]
