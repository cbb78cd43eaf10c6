"""A model's recent service rate, to tell how long its waiting queue will take (HTTP 429s).

Torch-free and clock-free: the scheduler passes the time in, so a simulator can drive it.
"""

from __future__ import annotations

import math
from collections import deque

WINDOW_S = 30.0  # completions older than this no longer count
MIN_SAMPLES = 4  # completions a busy period needs before its rate replaces the last one
MAX_RETRY_AFTER_S = 3600  # a Retry-After past an hour says nothing more useful


class ServiceRate:
    """Requests a model finished per second while it had work, over the last `window` s.

    Only time with work counts: a model idle for an hour and then busy is not rated by the
    hour. Each busy period starts afresh; until it has `min_samples` completions the last
    period's estimate stands (None before any), so a burst onto an idle model is not refused
    for want of a rate — capped by what so few completions allow, so a stalled model's
    estimate falls as its busy time without completions grows.
    """

    def __init__(self, window: float = WINDOW_S, min_samples: int = MIN_SAMPLES) -> None:
        self.window = window
        self.min_samples = min_samples
        self._done: deque[float] = deque()  # completion times in this busy period
        self._busy_since = 0.0
        self._last: float | None = None

    def on_busy(self, now: float) -> None:
        """The model had no work and gets some: a new busy period starts."""
        self._busy_since = now

    def on_idle(self, now: float) -> None:
        """The model's last request left: its busy period ends, its estimate is kept."""
        self.rate(now)
        self._done.clear()

    def on_finished(self, now: float) -> None:
        """One of the model's requests left (served, failed or stopped; not aborted)."""
        self._done.append(now)

    def rate(self, now: float) -> float | None:
        """Requests per second (those in the window, over the busy time it covers); None
        until a busy period has shown one."""
        start = max(now - self.window, self._busy_since)
        while self._done and self._done[0] <= start:
            self._done.popleft()
        span = now - start
        if len(self._done) >= self.min_samples and span > 0:
            self._last = len(self._done) / span
            return self._last
        # Too few completions for a rate, yet they bound it: fewer than `min_samples` in
        # `span` busy seconds is a rate below min_samples / span. So a model whose workers
        # stall (or restart) is not rated by its speed before the stall for long.
        ceiling = self.min_samples / span if span > 0 else math.inf
        if self._last is None:
            return ceiling if span >= self.window else None
        self._last = min(self._last, ceiling)  # what the stall taught is kept
        return self._last

    def expected_wait(self, waiting: int, now: float) -> float | None:
        """Seconds until `waiting` queued requests have gone through; None when unknown."""
        if waiting == 0:
            return 0.0
        rate = self.rate(now)
        return None if rate is None else waiting / rate


def retry_after_s(wait: float | None) -> int:
    """A Retry-After for a refused request: the queue's expected wait, at least 1 s."""
    if wait is None:
        return 1
    return max(1, min(MAX_RETRY_AFTER_S, math.ceil(wait)))
