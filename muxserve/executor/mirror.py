"""Both halves of the job delta protocol: what a worker mirrors of its requests, and its encoder.

`WorkerMirror` lives in the engine process, one per worker: it records what that worker holds
and turns each `Job` into a `JobMessage` carrying only the difference. `RequestMirror` lives in
the worker: it applies a message to its copy and rebuilds the `Job`. So a decode step of a
batch costs a few ints per sequence on the wire, not its block table and sampling parameters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from muxserve.executor.messages import JobMessage, NewSeq, SeqStep
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import Job, Phase, SeqWork


class WorkerMirror:
    """The engine's record of one worker's mirror; encodes jobs for that worker.

    A block table only grows by appended logical blocks while its request holds them, so the
    worker is sent the rows past those it has. A preempted request gets a new table when it is
    admitted again: the job that admits it names it (`Job.fresh`), the cue to `invalidate` it
    everywhere.
    """

    def __init__(self) -> None:
        self._rows: dict[str, int] = {}  # request -> logical blocks of its table the worker has
        self._held: set[str] = set()  # requests the worker keeps anything of, fresh or stale
        self._finished: list[str] = []  # held requests to drop with the next message

    def encode(self, job: Job) -> JobMessage:
        new: list[NewSeq] = []
        steps: list[SeqStep] = []
        for s in job.seqs:
            rid, table = s.request_id, s.block_table
            sent = self._rows.get(rid)
            blocks = None
            if sent is None:
                new.append(NewSeq(rid, s.params, s.seed, table))
                self._held.add(rid)
            elif table.shape[0] > sent:
                blocks = table[sent:]
            self._rows[rid] = table.shape[0]
            steps.append(
                SeqStep(
                    rid,
                    s.token_ids,
                    s.start_pos,
                    s.sample,
                    s.step,
                    blocks,
                    s.history,
                    s.banned,
                    s.allowed,
                    s.prompt_len,
                    s.next_token,
                )
            )
        finished, self._finished = tuple(self._finished), []
        return JobMessage(job.job_id, job.sm_share, tuple(new), tuple(steps), finished, job.model)

    def invalidate(self, request_ids: Iterable[str]) -> None:
        """These requests' tables were rebuilt: send them whole next time."""
        for rid in request_ids:
            self._rows.pop(rid, None)

    def forget(self, request_ids: Iterable[str]) -> None:
        """These requests finished: tell the worker to drop them with its next job."""
        for rid in request_ids:
            if rid in self._held:
                self._held.discard(rid)
                self._rows.pop(rid, None)
                self._finished.append(rid)

    def reset(self) -> None:
        """The worker restarted with nothing: start over."""
        self._rows.clear()
        self._held.clear()
        self._finished.clear()

    def __len__(self) -> int:
        return len(self._held)


@dataclass(slots=True)
class _Mirrored:
    params: SamplingParams
    seed: int
    table: np.ndarray  # (logical blocks, layers, kv heads of one rank)


class RequestMirror:
    """A worker's copy of its requests' block tables and sampling settings."""

    def __init__(self, model: str, phase: Phase) -> None:
        self.model = model
        self.phase = phase
        self._seqs: dict[str, _Mirrored] = {}

    def apply(self, msg: JobMessage) -> Job:
        """Bring the mirror up to date with `msg` and return the job it describes."""
        for rid in msg.finished:
            self._seqs.pop(rid, None)
        for n in msg.new:
            self._seqs[n.request_id] = _Mirrored(n.params, n.seed, n.block_table)
        seqs = []
        for st in msg.steps:
            m = self._seqs[st.request_id]
            if st.new_blocks is not None:
                m.table = np.concatenate([m.table, st.new_blocks])
            seqs.append(
                SeqWork(
                    st.request_id,
                    st.token_ids,
                    st.start_pos,
                    m.table,
                    st.sample,
                    m.params,
                    m.seed,
                    st.step,
                    st.history,
                    st.banned,
                    st.allowed,
                    st.prompt_len,
                    st.next_token,
                )
            )
        # every request sent whole is new to this worker's runner: its device tables
        # (`DeviceTables`) write it from row 0, as for `Job.fresh` in the engine
        fresh = tuple(n.request_id for n in msg.new)
        return Job(msg.job_id, self.model, self.phase, tuple(seqs), msg.sm_share, fresh)

    def __len__(self) -> int:
        return len(self._seqs)
