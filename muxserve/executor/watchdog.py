"""When a running job's workers count as hung: stalled, or past a deadline.

Two signs, whichever comes first:

- **stalled**: a worker that makes no progress for `stall_s` — stopped (SIGSTOP: its state
  is "T") or, for a CPU worker, using no CPU time at all while it has a job. A slow worker on a
  loaded host still uses CPU, so it is not mistaken for a hung one. (A GPU worker may wait on
  the device without using CPU, so there only the stopped state counts.)
- **past its deadline**: `floor_s` plus `per_token_s` for every token the job computes (a
  fresh worker's first job gets the floor twice): the backstop for a worker that spins.

The mps executor kills a hung group and hands its job back for recompute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from muxserve.scheduler.job import Job


@dataclass(frozen=True)
class JobDeadline:
    """`floor_s` plus `per_token_s` for every token the job computes; `stall_s`: seconds
    without progress (None: only the deadline counts)."""

    floor_s: float = 60.0
    per_token_s: float = 0.01
    stall_s: float | None = 10.0

    def of(self, job: Job, first: bool = False) -> float:
        """Seconds `job` may run before its workers count as hung; a fresh worker's `first`
        job gets the floor twice (its first forward pays for lazy initialisation)."""
        return self.floor_s * (2 if first else 1) + self.per_token_s * job.num_tokens


@dataclass(frozen=True)
class ProcSample:
    """What /proc says of a process at one moment."""

    stopped: bool  # state T (stopped by a signal) or t (traced)
    cpu_ticks: int  # user + system time, in clock ticks


def read_proc(pid: int) -> ProcSample | None:
    """The process's state and CPU time from /proc/<pid>/stat; None if unreadable (gone, or
    no /proc here)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; fields follow the last ')'
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return ProcSample(fields[0] in ("T", "t"), int(fields[11]) + int(fields[12]))
    except (IndexError, ValueError):
        return None


class ProgressProbe:
    """Tracks when each watched process last made progress (CPU time, not stopped), per job:
    a new job (another `job_key`) starts the clock again, so idle time between jobs is no
    stall."""

    def __init__(self, read: Callable[[int], ProcSample | None] = read_proc) -> None:
        self._read = read
        # pid -> (the job it is watched for, cpu ticks, when they last moved)
        self._last: dict[int, tuple[object, int, float]] = {}

    def stalled_for(self, pid: int, job_key: object, now: float, cpu_counts: bool) -> float:
        """Seconds since `pid` last made progress on the job `job_key`, as of `now`; 0.0 at
        the first look, and for a process that cannot be read. `cpu_counts`: CPU time counts
        as progress (CPU workers); else only the stopped state tells (GPU workers wait on the
        device without using CPU)."""
        sample = self._read(pid)
        if sample is None:
            self._last.pop(pid, None)
            return 0.0
        last = self._last.get(pid)
        if last is None or last[0] != job_key:
            self._last[pid] = (job_key, sample.cpu_ticks, now)
            return 0.0
        _, ticks, since = last
        if not sample.stopped and (sample.cpu_ticks != ticks or not cpu_counts):
            since = now
        self._last[pid] = (job_key, sample.cpu_ticks, since)
        return now - since

    def forget(self, pids: list[int]) -> None:
        """These processes are gone: stop tracking them."""
        for pid in pids:
            self._last.pop(pid, None)
