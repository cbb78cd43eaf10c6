"""The job delta protocol without processes: the engine's mirror encodes, the worker's applies."""

from __future__ import annotations

import numpy as np

from muxserve.executor.mirror import RequestMirror, WorkerMirror
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import Job, Phase, SeqWork

GREEDY = SamplingParams(temperature=0.0)
SEEDED = SamplingParams(temperature=0.8, seed=3)


def table(first: int, rows: int, layers: int = 2, heads: int = 4) -> np.ndarray:
    n = rows * layers * heads
    return np.arange(first, first + n, dtype=np.int32).reshape(rows, layers, heads)


def seq(rid: str, t: np.ndarray, start: int, tokens: tuple[int, ...], step: int = 0) -> SeqWork:
    params = SEEDED if rid.endswith("s") else GREEDY
    return SeqWork(rid, tokens, start, t, True, params, seed=len(rid), step=step)


def job(job_id: int, *seqs: SeqWork) -> Job:
    return Job(job_id, "m", Phase.DECODE, seqs, 0.5)


def roundtrip(enc: WorkerMirror, dec: RequestMirror, j: Job) -> Job:
    return dec.apply(enc.encode(j))


def same(a: Job, b: Job) -> None:
    assert (a.job_id, a.model, a.phase, a.sm_share) == (b.job_id, b.model, b.phase, b.sm_share)
    for x, y in zip(a.seqs, b.seqs, strict=True):
        assert (x.request_id, x.token_ids, x.start_pos, x.sample) == (
            y.request_id,
            y.token_ids,
            y.start_pos,
            y.sample,
        )
        assert (x.params, x.seed, x.step) == (y.params, y.seed, y.step)
        np.testing.assert_array_equal(y.block_table, x.block_table)


def test_first_job_sends_everything_then_only_tokens():
    enc, dec = WorkerMirror(), RequestMirror("m", Phase.DECODE)
    t = table(0, 2)
    first = job(1, seq("a", t, 5, (7,)), seq("bs", table(100, 1), 3, (9,)))
    msg = enc.encode(first)
    assert [n.request_id for n in msg.new] == ["a", "bs"]
    same(first, dec.apply(msg))
    second = job(2, seq("a", t, 6, (8,), 1), seq("bs", table(100, 1), 4, (2,), 1))
    msg = enc.encode(second)
    assert msg.new == () and all(s.new_blocks is None for s in msg.steps)
    same(second, dec.apply(msg))


def test_appended_blocks_travel_alone():
    enc, dec = WorkerMirror(), RequestMirror("m", Phase.DECODE)
    t = table(0, 2)
    roundtrip(enc, dec, job(1, seq("a", t, 5, (7,))))
    grown = np.concatenate([t, table(50, 1)])
    msg = enc.encode(job(2, seq("a", grown, 6, (8,))))
    assert msg.steps[0].new_blocks is not None
    np.testing.assert_array_equal(msg.steps[0].new_blocks, table(50, 1))
    same(job(2, seq("a", grown, 6, (8,))), dec.apply(msg))


def test_invalidated_request_is_sent_whole_again():
    """A preempted request comes back with a new table: the mirror must not append to the old."""
    enc, dec = WorkerMirror(), RequestMirror("m", Phase.DECODE)
    roundtrip(enc, dec, job(1, seq("a", table(0, 2), 5, (7,))))
    enc.invalidate(["a"])
    again = job(2, seq("a", table(300, 3), 0, (1, 2, 3)))
    msg = enc.encode(again)
    assert [n.request_id for n in msg.new] == ["a"]
    rebuilt = dec.apply(msg)
    same(again, rebuilt)
    assert rebuilt.fresh == ("a",)  # the worker's runner rewrites its device table


def test_rebuilt_jobs_name_what_the_worker_got_whole_as_fresh():
    enc, dec = WorkerMirror(), RequestMirror("m", Phase.DECODE)
    first = roundtrip(
        enc, dec, job(1, seq("a", table(0, 2), 5, (7,)), seq("b", table(9, 1), 2, (3,)))
    )
    assert first.fresh == ("a", "b")
    assert roundtrip(enc, dec, job(2, seq("a", table(0, 2), 6, (8,)))).fresh == ()


def test_finished_requests_are_dropped_with_the_next_job():
    enc, dec = WorkerMirror(), RequestMirror("m", Phase.DECODE)
    roundtrip(enc, dec, job(1, seq("a", table(0, 1), 5, (7,)), seq("b", table(9, 1), 2, (4,))))
    enc.forget(["a", "never-seen"])
    msg = enc.encode(job(2, seq("b", table(9, 1), 3, (5,))))
    assert msg.finished == ("a",)
    dec.apply(msg)
    assert len(dec) == 1 and len(enc) == 1


def test_reset_after_a_restart_resends():
    enc = WorkerMirror()
    enc.encode(job(1, seq("a", table(0, 1), 5, (7,))))
    enc.reset()
    dec = RequestMirror("m", Phase.DECODE)  # the new process knows nothing
    same(
        job(2, seq("a", table(0, 1), 6, (8,))),
        roundtrip(enc, dec, job(2, seq("a", table(0, 1), 6, (8,)))),
    )


def test_every_rank_gets_the_whole_table():
    """Under TP the scheduler's table holds one rank's KV heads: each rank reads the same block
    ids in its own pool, so every rank's mirror sends the table as it is."""
    ranks = [(WorkerMirror(), RequestMirror("m", Phase.DECODE)) for _ in range(2)]
    t = table(0, 2)
    first = job(1, seq("a", t, 5, (7,)))
    second = job(2, seq("a", np.concatenate([t, table(50, 1)]), 6, (8,)))
    for enc, dec in ranks:
        msg = enc.encode(first)
        assert msg.new[0].block_table.shape == (2, 2, 4)
        same(first, dec.apply(msg))
        msg = enc.encode(second)
        assert msg.steps[0].new_blocks is not None and msg.steps[0].new_blocks.shape == (1, 2, 4)
        same(second, dec.apply(msg))
