"""How long a job may run before its workers count as hung.

A deadline grows with the job's size (tokens to compute) over a floor, so a long prefill on a
slow device is not mistaken for a hang, and a stopped worker is found within seconds of the
floor. The mps executor kills a hung group and hands its job back for recompute.
"""

from __future__ import annotations

from dataclasses import dataclass

from muxserve.scheduler.job import Job


@dataclass(frozen=True)
class JobDeadline:
    """`floor_s` plus `per_token_s` for every token the job computes."""

    floor_s: float = 60.0
    per_token_s: float = 0.01

    def of(self, job: Job, first: bool = False) -> float:
        """Seconds `job` may run before its workers count as hung; a fresh worker's `first`
        job gets the floor twice (its first forward pays for lazy initialisation)."""
        return self.floor_s * (2 if first else 1) + self.per_token_s * job.num_tokens
