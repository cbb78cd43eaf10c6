"""Which (model, phase) jobs to form next: ADBS or FCFS."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from muxserve.scheduler.job import Phase
from muxserve.scheduler.model_slot import ModelQueue


class JobPolicy(Protocol):
    max_jobs_in_flight: int | None  # None: bounded by SM admission only

    def candidates(
        self, queues: Sequence[ModelQueue], jobs_in_flight: int
    ) -> list[tuple[ModelQueue, Phase]]:
        """(model, phase) pairs to try, best first; the scheduler skips busy or empty ones."""
        ...


class AdbsPolicy:
    """Prefill before decode, round-robin across models, several jobs in flight at once."""

    max_jobs_in_flight: int | None = None

    def __init__(self) -> None:
        self._next = 0

    def candidates(
        self, queues: Sequence[ModelQueue], jobs_in_flight: int
    ) -> list[tuple[ModelQueue, Phase]]:
        n = len(queues)
        order = [queues[(self._next + i) % n] for i in range(n)]
        self._next = (self._next + 1) % n
        return [(q, Phase.PREFILL) for q in order] + [(q, Phase.DECODE) for q in order]


class FcfsPolicy:
    """One job at a time, for the model and phase of the oldest unfinished request.

    The temporal-multiplexing baseline: models take turns on the whole device in arrival
    order. Later candidates are fallbacks for when the oldest cannot run (no blocks yet).
    """

    max_jobs_in_flight: int | None = 1

    def candidates(
        self, queues: Sequence[ModelQueue], jobs_in_flight: int
    ) -> list[tuple[ModelQueue, Phase]]:
        if jobs_in_flight:
            return []
        keyed: list[tuple[float, int, ModelQueue, Phase]] = []
        for i, q in enumerate(queues):
            oldest = {Phase.PREFILL: float("inf"), Phase.DECODE: float("inf")}
            for r in q.running:
                if not r.in_flight:
                    phase = Phase.DECODE if r.is_decoding else Phase.PREFILL
                    oldest[phase] = min(oldest[phase], r.arrival_time)
            if q.waiting:
                oldest[Phase.PREFILL] = min(oldest[Phase.PREFILL], q.waiting[0].arrival_time)
            keyed += [(t, i, q, p) for p, t in oldest.items() if t != float("inf")]
        keyed.sort(key=lambda k: (k[0], k[1], k[3] is Phase.DECODE))
        return [(q, p) for _, _, q, p in keyed]
