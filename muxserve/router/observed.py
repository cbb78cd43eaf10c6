"""The workload the router sees: each model's request rate and mean lengths over a sliding window.

The router records every request it admits (`arrived`, with its prompt length) and every
request that finishes (`finished`, with its output length); `snapshot` turns the last
`window_s` seconds into per-model rates and means, which is what re-planning plans for. No
torch, no asyncio: a clock is passed in, so tests drive time exactly.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ObservedLoad:
    """One model's demand over the window."""

    rate: float  # requests/s admitted
    prompt_len: float | None  # mean prompt tokens of those requests (None: no request)
    output_len: float | None  # mean output tokens of the requests that finished (None: none)
    requests: int  # admitted within the window


class WorkloadWindow:
    """Per-model arrivals and completions of the last `window_s` seconds.

    Rates divide by the window, or by the time since the window began filling when that is
    shorter (so the first seconds do not read as a low rate).
    """

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if window_s <= 0:
            raise ValueError(f"the workload window must be positive, got {window_s:g} s")
        self.window_s = window_s
        self._clock = clock
        self._since = clock()
        self._arrivals: dict[str, deque[tuple[float, int]]] = {}
        self._finishes: dict[str, deque[tuple[float, int]]] = {}

    def arrived(self, model: str, prompt_len: int) -> None:
        """A request for `model` with `prompt_len` tokens was admitted now."""
        self._add(self._arrivals, model, prompt_len)

    def finished(self, model: str, output_len: int) -> None:
        """A request for `model` finished now with `output_len` generated tokens."""
        self._add(self._finishes, model, output_len)

    def _add(self, events: dict[str, deque[tuple[float, int]]], model: str, n: int) -> None:
        now = self._clock()
        q = events.setdefault(model, deque())
        q.append((now, n))
        _trim(q, now - self.window_s)  # memory stays bounded by the window, snapshots or not

    def snapshot(self, models: Iterable[str]) -> dict[str, ObservedLoad]:
        """Every model of `models` (and any other seen) over the window ending now."""
        now = self._clock()
        start = now - self.window_s
        span = min(self.window_s, now - self._since)
        out = {}
        for name in dict.fromkeys([*models, *self._arrivals, *self._finishes]):
            arrivals = _trim(self._arrivals.get(name), start)
            finishes = _trim(self._finishes.get(name), start)
            rate = len(arrivals) / span if span > 0 else 0.0
            out[name] = ObservedLoad(rate, _mean(arrivals), _mean(finishes), len(arrivals))
        return out

    def reset(self) -> None:
        """Forget everything (the window starts filling again now)."""
        self._since = self._clock()
        self._arrivals.clear()
        self._finishes.clear()


def _trim(events: deque[tuple[float, int]] | None, start: float) -> deque[tuple[float, int]]:
    """Drop events at or before `start`; what is left is the window."""
    if events is None:
        return deque()
    while events and events[0][0] <= start:
        events.popleft()
    return events


def _mean(events: deque[tuple[float, int]]) -> float | None:
    return sum(n for _, n in events) / len(events) if events else None


def drift(planned: Mapping[str, float], observed: Mapping[str, float], floor: float) -> float:
    """How far the observed rates are from those a plan was made for: the largest relative
    change over models, each measured against max(planned rate, `floor`).

    The floor keeps a nearly idle model's noise (0.01 -> 0.05 req/s is +400%) from counting
    as drift: below it, changes are measured in units of the floor.
    """
    if floor <= 0:
        raise ValueError(f"the drift floor must be positive, got {floor:g}")
    names = set(planned) | set(observed)
    return max(
        (
            abs(observed.get(n, 0.0) - planned.get(n, 0.0)) / max(planned.get(n, 0.0), floor)
            for n in names
        ),
        default=0.0,
    )
