"""Which models of an engine stay awake when their weights do not all fit at once; torch-free.

Each model's value is its request rate, exponentially decayed with a half-life, started from
the rate its config expects (so a model nobody has asked for yet is worth what the plan said,
and the prior fades as requests are seen). When a wake does not fit, the awake models that
are idle (no request waiting or running) and have been awake at least `min_residency_s` are
put to sleep, least valuable first, until it does; a model with requests in flight is never
chosen, and the minimum residency keeps two busy models from evicting each other at every
request. See docs/elastic.md.

Also here, as the records every layer above shares: a model's `ModelState` and its `WakeStats`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass


class ModelState(enum.Enum):
    """Where a model is between holding its weights on the device and not."""

    AWAKE = "awake"  # weights on the device: serves
    ASLEEP = "asleep"  # no device weights, no KV blocks; a request (or `wake`) wakes it
    WAKING = "waking"  # its weights are coming back; its requests wait
    SLEEPING = "sleeping"  # its weights are leaving the device


@dataclass(frozen=True)
class WakeStats:
    """A model's sleeps and wakes since its engine started (cumulative, for metrics).

    `wake_buckets[i]` counts the wakes that took at most `WAKE_BUCKETS[i]` seconds (a
    Prometheus histogram's cumulative buckets; the +Inf bucket is `wakes`).
    """

    sleeps: int = 0
    wakes: int = 0
    wake_seconds: float = 0.0  # the sum over every wake
    wake_buckets: tuple[int, ...] = ()


# upper bounds (s) of the wake-time histogram's buckets
WAKE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class ResidencySettings:
    """The policy's knobs (`engine.residency` in the config)."""

    half_life_s: float = 60.0  # of a model's decayed request rate
    min_residency_s: float = 10.0  # awake at least this long before it may be put to sleep
    idle_sleep_s: float | None = None  # idle this long: put to sleep without pressure; None: never

    def __post_init__(self) -> None:
        if not self.half_life_s > 0:
            raise ValueError(f"half_life_s must be > 0, got {self.half_life_s}")
        if not self.min_residency_s >= 0:
            raise ValueError(f"min_residency_s must be >= 0, got {self.min_residency_s}")
        if self.idle_sleep_s is not None and not self.idle_sleep_s > 0:
            raise ValueError(f"idle_sleep_s must be > 0 or None, got {self.idle_sleep_s}")


@dataclass
class _Demand:
    score: float  # decayed request count; rate = score * ln 2 / half-life
    at: float  # when `score` was last brought up to date
    awake_since: float | None  # None: asleep
    last_request: float  # for idle_sleep_s


class ResidencyPolicy:
    """Tracks each model's demand and residency; chooses which models to put to sleep."""

    def __init__(
        self,
        priors: Mapping[str, float],
        settings: ResidencySettings | None = None,
        clock: Callable[[], float] | None = None,
        awake: Collection[str] | None = None,
    ) -> None:
        """`priors`: each model's expected requests/s; `awake`: those awake now (default all).
        `clock` defaults to `time.monotonic`."""
        import time

        self.settings = settings or ResidencySettings()
        self.clock = clock or time.monotonic
        now = self.clock()
        awake = set(priors) if awake is None else set(awake)
        unknown = awake - set(priors)
        if unknown:
            raise ValueError(f"awake models not listed: {sorted(unknown)}")
        self._decay = math.log(2) / self.settings.half_life_s
        self._models = {
            m: _Demand(max(rate, 0.0) / self._decay, now, now if m in awake else None, now)
            for m, rate in priors.items()
        }

    # ---- events ----------------------------------------------------------------------------
    def add(self, model: str, rate: float) -> None:
        """A model joined, asleep, expected at `rate` requests/s."""
        now = self.clock()
        self._models[model] = _Demand(max(rate, 0.0) / self._decay, now, None, now)

    def forget(self, model: str) -> None:
        """A model left."""
        self._models.pop(model, None)

    def on_request(self, model: str) -> None:
        """A request for `model` arrived."""
        d = self._models[model]
        now = self.clock()
        d.score = self._score(d, now) + 1.0
        d.at = d.last_request = now

    def on_awake(self, model: str) -> None:
        """`model` woke: its minimum residency starts now."""
        d = self._models[model]
        d.awake_since = d.last_request = self.clock()

    def on_asleep(self, model: str) -> None:
        self._models[model].awake_since = None

    # ---- queries ---------------------------------------------------------------------------
    def rate(self, model: str) -> float:
        """The model's decayed request rate (requests/s): its value."""
        d = self._models[model]
        return self._score(d, self.clock()) * self._decay

    def evictable(self, busy: Collection[str]) -> list[str]:
        """Awake models that may be put to sleep now, least valuable first: idle (not in
        `busy`) and awake for at least the minimum residency."""
        now = self.clock()
        out = [
            m
            for m, d in self._models.items()
            if d.awake_since is not None
            and m not in busy
            and now - d.awake_since >= self.settings.min_residency_s
        ]
        return sorted(out, key=lambda m: (self.rate(m), m))

    def make_room(
        self, need: int, free: int, held: Mapping[str, int], busy: Collection[str]
    ) -> list[str] | None:
        """The models to put to sleep so that `need` bytes fit, `free` being free now and
        `held` what each awake model holds: the fewest of the least valuable evictable ones.
        [] when it fits already; None when even all evictable models do not make room."""
        if need <= free:
            return []
        victims: list[str] = []
        for m in self.evictable(busy):
            if m not in held:
                continue
            victims.append(m)
            free += held[m]
            if need <= free:
                return victims
        return None

    def next_eviction_in(self, busy: Collection[str]) -> float | None:
        """Seconds until another awake idle model passes its minimum residency; None if none
        will (all busy or asleep)."""
        now = self.clock()
        waits = [
            d.awake_since + self.settings.min_residency_s - now
            for m, d in self._models.items()
            if d.awake_since is not None and m not in busy
        ]
        later = [w for w in waits if w > 0]
        return min(later) if later else None

    def idle_too_long(self, busy: Collection[str]) -> list[str]:
        """Awake idle models whose last request is over `idle_sleep_s` old (and past their
        minimum residency): to be put to sleep without pressure. [] without `idle_sleep_s`."""
        idle = self.settings.idle_sleep_s
        if idle is None:
            return []
        now = self.clock()
        return [m for m in self.evictable(busy) if now - self._models[m].last_request >= idle]

    def _score(self, d: _Demand, now: float) -> float:
        return d.score * math.exp(-self._decay * max(now - d.at, 0.0))
