"""Which worker units are hung, for the mps executor to kill and start again.

A unit (a model's own worker group, or a pooled worker) is hung when its delivered job is past
its deadline (`JobDeadline`), when one of its workers makes no progress for the deadline's
`stall_s` (stopped, or on a CPU using no CPU time: `ProgressProbe`), or when a restart with a
job waiting on it is not ready within `start_timeout`. The executor asks at every round of its
poll; /proc is read at most every STALL_SAMPLE_S, not at every result of that hot loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from multiprocessing.process import BaseProcess

from muxserve.executor.watchdog import JobDeadline, ProgressProbe
from muxserve.executor.worker_unit import GroupState, WorkerDied, WorkerUnit

STALL_SAMPLE_S = 1.0  # how often a running job's workers are checked for progress (/proc)
START_TIMEOUT_S = 180.0  # every worker of the engine ready within this, or the engine fails

# what runs a (model, phase)'s jobs: its own processes, or a pooled worker it shares; the
# executor drives both through what `WorkerUnit` declares
Unit = WorkerUnit


class HangWatch:
    """The deadlines of the units' jobs and starts, and the progress of their workers."""

    def __init__(
        self,
        deadline: JobDeadline | None,
        cpu_workers: bool,
        start_timeout: float = START_TIMEOUT_S,
    ) -> None:
        """`cpu_workers`: the workers run on a CPU, so using no CPU time means no progress
        (on a GPU a worker may wait on the device without it; only the stopped state counts)."""
        self.deadline = deadline or JobDeadline()
        self.start_timeout = start_timeout  # a restarted unit not ready by then is hung too
        self.cpu_workers = cpu_workers
        self.progress = ProgressProbe()
        self.hangs = 0  # units found hung
        self._next_sample = 0.0  # time.monotonic() of the next look at /proc

    def hung(self, units: Iterable[Unit]) -> list[tuple[Unit, WorkerDied]]:
        """The units to kill now, each with why; counted in `hangs`."""
        now = time.monotonic()
        sample = self.deadline.stall_s is not None and now >= self._next_sample
        if sample:
            self._next_sample = now + min(STALL_SAMPLE_S, self.deadline.stall_s or 0.0)
        found = []
        for unit in units:
            died = None
            why = self._why(unit, now, sample)
            if why is not None:
                died = WorkerDied(f"{why}; killed", False)
            elif (
                unit.state is GroupState.STARTING
                and unit.job is not None
                and now - unit.started_at >= self.start_timeout
            ):
                waited = now - unit.started_at
                died = WorkerDied(f"not ready after {waited:.1f} s (hung starting); killed", True)
            if died is not None:
                self.hangs += 1
                found.append((unit, died))
        return found

    def next_check(self, units: Sequence[Unit]) -> float:
        """When the earliest delivered job, or a restart with a job waiting on it, reaches its
        deadline, or the next look at /proc is due while jobs run (inf: none of these)."""
        running = [u for u in units if u.delivered and u.job is not None]
        ends = [u.sent_at + self.deadline.of(u.job, u.jobs_done == 0) for u in running if u.job]
        if running and self.deadline.stall_s is not None:  # sample their progress meanwhile
            ends.append(self._next_sample)
        ends += [
            u.started_at + self.start_timeout
            for u in units
            if u.state is GroupState.STARTING and u.job is not None
        ]
        return min(ends, default=float("inf"))

    def forget(self, procs: Iterable[BaseProcess]) -> None:
        """Stop following these workers (killed or stopped)."""
        self.progress.forget([p.pid for p in procs if p.pid is not None])

    def _why(self, unit: Unit, now: float, sample: bool) -> str | None:
        """Why the unit's delivered job counts as hung (past its deadline, or — in a round
        that `sample`s /proc — a worker that made no progress for `deadline.stall_s`)."""
        if not unit.delivered or unit.job is None:
            return None
        ran = now - unit.sent_at
        if ran >= self.deadline.of(unit.job, unit.jobs_done == 0):
            return f"no result after {ran:.1f} s (hung)"
        limit = self.deadline.stall_s
        if not sample or limit is None or not unit.procs:
            return None
        key = (unit.label, unit.sent_at)
        stalled = max(
            self.progress.stalled_for(p.pid, key, now, self.cpu_workers)
            for p in unit.procs
            if p.pid is not None
        )
        if stalled >= limit:
            return f"no progress for {stalled:.1f} s (stopped or stuck; {ran:.1f} s into its job)"
        return None
