"""The jobs running at once on one mesh, and how they slow each other: the simulator's clock.

A job's latency from the cost model is its latency *alone*, at its SM share. Jobs of the
models sharing a mesh run at the same time, so how fast each goes depends on the others:

- `none`: every job takes its latency alone (no contention: an upper bound on the service).
- `start`: a job is slowed once, when it starts, by the most the SMs or the HBM bandwidth
  are over-asked at that moment (Σ SM shares, Σ bandwidth demands of the running jobs and
  itself), and keeps that pace. The simulator's first model, kept so older results reproduce.
- `shared` (processor sharing): the pace of every running job is recomputed whenever a job
  starts or ends, from the set running at that moment. SMs: when the shares add up to
  S > 1 (the scheduler allows a small overload), each job runs on share / S of the SMs, at
  the pace the cost model's SM curve gives for that share (MPS prefill better than linear,
  decode losing little until bandwidth saturates). HBM: compute-bound jobs (prefills) draw
  the bandwidth they need (their reads overlap their compute), and memory-bound jobs
  (decodes) share what is left: when their demands add up to more, each slows in
  proportion. A job's demand is its bytes over its latency, as a fraction of the device's
  achievable bandwidth — a fluid: the bytes are spread evenly over the job, overheads
  included, and launch overheads slow with the rest.
- `peak`: as `shared`, but a job's demand is its bytes over the part of its latency that
  moves them (less the fixed per-step overhead, in which it reads nothing), so jobs whose
  memory phases overlap count as fully in each other's way; the whole job still slows. A
  pessimistic bracket around `shared`'s fluid: with `none`, the two bound the contention.

Why: the planner budgets SM time and bandwidth on average, and its estimator and the
authors' disagree about how much co-located models slow each other; a clock that charges
exactly the moments when jobs overlap is the evidence neither estimator is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar, get_args

Contention = Literal["none", "start", "shared", "peak"]
CONTENTION_MODES: tuple[str, ...] = get_args(Contention)

_SHARING = ("shared", "peak")  # the modes that re-pace at every start and end
T = TypeVar("T")
_EPS = 1e-12  # shares and demands this close to the device's count as fitting


@dataclass(frozen=True)
class JobDemand:
    """What one job asks of the device, and how long it takes with the device to itself."""

    alone_s: float  # seconds at its SM share, no other job running (the cost model's latency)
    sm: float  # its SM share
    hbm: float  # fraction of the device's achievable HBM bandwidth it draws at full pace
    compute_bound: bool  # a prefill: slowed by fewer SMs, not by others' reads
    # seconds alone at a smaller SM share (the cost model's SM curve); None: in proportion
    at_share: Callable[[float], float] | None = None
    busy_s: float | None = None  # of `alone_s`, the seconds that move bytes (None: all)

    def __post_init__(self) -> None:
        if not (self.alone_s > 0 and math.isfinite(self.alone_s)):
            raise ValueError(f"a job's latency must be positive and finite, got {self.alone_s}")
        if self.sm <= 0 or self.hbm < 0:
            raise ValueError(f"a job needs a positive SM share and a bandwidth demand ≥ 0, got "
                             f"sm {self.sm}, hbm {self.hbm}")  # fmt: skip

    def peak_hbm(self) -> float:
        """Its demand while it moves bytes: `hbm` over the share of its time that does."""
        if self.busy_s is None or self.busy_s >= self.alone_s:
            return self.hbm
        return max(self.hbm, min(1.0, self.hbm * self.alone_s / self.busy_s))

    def pace_on(self, share: float) -> float:
        """Its pace (work per second, 1 alone) when it gets only `share` of the SMs."""
        if share >= self.sm:
            return 1.0
        if self.at_share is None:
            return share / self.sm
        return min(1.0, self.alone_s / self.at_share(share))


@dataclass(eq=False)
class _Entry(Generic[T]):
    end: float  # when it ends at its current pace
    order: int  # start order: ties end the earlier started first
    item: T
    demand: JobDemand
    pace: float = 1.0  # seconds of its work done per second
    _paces: dict[float, float] = field(default_factory=dict)  # SM pace per SM oversubscription


class RunningJobs(Generic[T]):
    """The jobs running on one mesh, each ending when its work is done at the pace it gets.

    `start` adds a job at `now`; `next_end` tells when the first one ends; `pop` ends it (the
    clock moves to its end) and, under `shared` and `peak`, re-paces the rest.
    """

    def __init__(self, contention: Contention) -> None:
        if contention not in CONTENTION_MODES:
            raise ValueError(f"contention must be one of {CONTENTION_MODES}, got {contention!r}")
        self.contention = contention
        self._jobs: list[_Entry[T]] = []
        self._order = 0
        self.contended = False  # some job ran slower than alone: `none` would differ

    def __len__(self) -> int:
        return len(self._jobs)

    def start(self, now: float, item: T, demand: JobDemand) -> None:
        """`item` starts at `now`."""
        slow = 1.0
        if self.contention == "start":
            sm = demand.sm + sum(e.demand.sm for e in self._jobs)
            hbm = demand.hbm + sum(e.demand.hbm for e in self._jobs)
            slow = max(1.0, sm, hbm)
        entry = _Entry(now + demand.alone_s * slow, self._order, item, demand, 1.0 / slow)
        self._order += 1
        self._jobs.append(entry)
        self.contended |= slow > 1.0
        if self.contention in _SHARING:
            self._repace(now)

    def next_end(self) -> float | None:
        """When the first running job ends at the present paces (None: nothing runs)."""
        return min((e.end for e in self._jobs), default=None)

    def pop(self) -> tuple[float, T]:
        """End the job that ends first (the earlier started on a tie): (its end, it)."""
        if not self._jobs:
            raise IndexError("no job is running")
        first = min(self._jobs, key=lambda e: (e.end, e.order))
        self._jobs.remove(first)
        if self.contention in _SHARING:
            self._repace(first.end)
        return first.end, first.item

    def paces(self) -> list[tuple[T, float]]:
        """Each running job, in start order, with its pace (1: as fast as alone)."""
        return [(e.item, e.pace) for e in self._jobs]

    # ---- processor sharing --------------------------------------------------------------
    def _repace(self, now: float) -> None:
        """Give every running job the pace the present set allows, keeping the work it has done."""
        for entry, pace in zip(self._jobs, self._shared_paces(), strict=True):
            if pace != entry.pace:  # unchanged paces keep their end exactly
                left = (entry.end - now) * entry.pace  # seconds of work alone
                entry.end = now + left / pace
                entry.pace = pace
                self.contended |= pace < 1.0

    def _shared_paces(self) -> list[float]:
        jobs = self._jobs
        over = sum(e.demand.sm for e in jobs)
        fits = over <= 1.0 + _EPS
        paces = [1.0] * len(jobs) if fits else [_sm_pace(e, over) for e in jobs]
        peak = self.contention == "peak"
        drawn = [(e.demand.peak_hbm() if peak else e.demand.hbm) * p
                 for e, p in zip(jobs, paces, strict=True)]  # fmt: skip
        compute = sum(d for e, d in zip(jobs, drawn, strict=True) if e.demand.compute_bound)
        total = sum(drawn)
        if total <= 1.0 + _EPS:
            return paces
        if compute < 1.0:  # memory-bound jobs share what the compute-bound ones leave
            scale = (1.0 - compute) / (total - compute)
            return [p if e.demand.compute_bound else p * scale
                    for e, p in zip(jobs, paces, strict=True)]  # fmt: skip
        return [p / total for p in paces]  # even the compute-bound ones saturate HBM


def _sm_pace(entry: _Entry[T], over: float) -> float:
    """A job's pace on its share of oversubscribed SMs (memoized: few distinct sums recur)."""
    pace = entry._paces.get(over)
    if pace is None:
        pace = entry._paces[over] = entry.demand.pace_on(entry.demand.sm / over)
    return pace
