"""Profiled job latencies (JSON, measured on a real GPU) that override the analytic model.

Entries are keyed by architecture (`PlannerModel.arch_key`), tensor-parallel degree, phase and
SM share. Within an entry latencies are interpolated linearly (and extrapolated from the last
two points); between SM shares linearly in 1/share, and outside the profiled shares the
nearest entry is scaled by the analytic model's ratio. The format is in docs/placement.md.
"""

from __future__ import annotations

import bisect
import itertools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from muxserve.errors import ConfigError
from placement.files import Strict, validate

FORMAT = "muxserve-profile/1"


def _increasing(xs: Sequence[float], key: str) -> None:
    if any(b <= a for a, b in itertools.pairwise(xs)):
        raise ValueError(f"{key} must be strictly increasing")


class PrefillEntry(Strict):
    """Prefill latency against the number of tokens in the job."""

    model: str  # PlannerModel.arch_key
    tp: int = Field(ge=1)
    sm: float = Field(gt=0, le=1)
    phase: Literal["prefill"]
    tokens: list[float] = Field(min_length=1)
    latency_s: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _shape(self) -> PrefillEntry:
        _increasing(self.tokens, "tokens")
        if len(self.latency_s) != len(self.tokens):
            raise ValueError("latency_s needs one value per entry of tokens")
        if any(t <= 0 for t in self.latency_s):
            raise ValueError("latencies must be positive")
        return self


class DecodeEntry(Strict):
    """Decode-step latency on a batch × context grid: `latency_s[i][j]` at batch[i], context[j]."""

    model: str
    tp: int = Field(ge=1)
    sm: float = Field(gt=0, le=1)
    phase: Literal["decode"]
    batch: list[float] = Field(min_length=1)
    context: list[float] = Field(min_length=1)
    latency_s: list[list[float]] = Field(min_length=1)

    @model_validator(mode="after")
    def _shape(self) -> DecodeEntry:
        _increasing(self.batch, "batch")
        _increasing(self.context, "context")
        if len(self.latency_s) != len(self.batch) or any(
            len(row) != len(self.context) for row in self.latency_s
        ):
            raise ValueError("latency_s must have one row per batch, one column per context")
        if any(t <= 0 for row in self.latency_s for t in row):
            raise ValueError("latencies must be positive")
        return self


class ProfileFile(Strict):
    format: Literal["muxserve-profile/1"]
    gpu: str  # the GPU it was measured on
    entries: list[Annotated[PrefillEntry | DecodeEntry, Field(discriminator="phase")]]


def interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Linear interpolation; clamped below the first point, extrapolated past the last."""
    return _interp_rows(xs, x, lambda k: ys[k])


def _interp_rows(xs: Sequence[float], x: float, y: Callable[[int], float]) -> float:
    """`interp`, reading only the one or two points it needs (`y(k)` is the k-th)."""
    if len(xs) == 1 or x <= xs[0]:
        return float(y(0))
    if x > xs[-1]:
        y1, y2 = y(len(xs) - 2), y(len(xs) - 1)
        slope = (y2 - y1) / (xs[-1] - xs[-2])
        return float(y2 + max(slope, 0.0) * (x - xs[-1]))
    k = bisect.bisect_left(xs, x)  # xs[k - 1] < x <= xs[k]
    if x == xs[k]:
        return float(y(k))
    ya, yb = y(k - 1), y(k)
    return float(ya + (yb - ya) * (x - xs[k - 1]) / (xs[k] - xs[k - 1]))


Analytic = Callable[[float], float]  # latency at an SM share, from the analytic model


class ProfileTable:
    """Lookup over a profile file's entries."""

    def __init__(self, profile: ProfileFile) -> None:
        self.gpu = profile.gpu
        self._prefill: dict[tuple[str, int], list[PrefillEntry]] = {}
        self._decode: dict[tuple[str, int], list[DecodeEntry]] = {}
        for e in profile.entries:
            if isinstance(e, PrefillEntry):
                self._prefill.setdefault((e.model, e.tp), []).append(e)
            else:
                self._decode.setdefault((e.model, e.tp), []).append(e)
        for pre in self._prefill.values():
            pre.sort(key=lambda e: e.sm)
        for dec in self._decode.values():
            dec.sort(key=lambda e: e.sm)

    def prefill(
        self, model: str, tp: int, sm: float, tokens: float, analytic: Analytic
    ) -> float | None:
        """Profiled prefill latency, or None where the table has no entry for (model, tp)."""
        entries = self._prefill.get((model, tp))
        if not entries:
            return None
        return _across_sm(
            [e.sm for e in entries],
            lambda k: interp(entries[k].tokens, entries[k].latency_s, tokens),
            sm,
            analytic,
        )

    def decode(
        self, model: str, tp: int, sm: float, batch: float, context: float, analytic: Analytic
    ) -> float | None:
        """Profiled decode-step latency, or None where the table has no entry."""
        entries = self._decode.get((model, tp))
        if not entries:
            return None

        def at(k: int) -> float:
            e = entries[k]
            return _interp_rows(
                e.batch, batch, lambda i: interp(e.context, e.latency_s[i], context)
            )

        return _across_sm([e.sm for e in entries], at, sm, analytic)


def _across_sm(
    shares: list[float], at: Callable[[int], float], sm: float, analytic: Analytic
) -> float:
    """Interpolate in 1/share between the two profiled shares around `sm` (only those two
    are looked up); outside the profiled shares, the nearest scaled by the analytic model."""
    if sm == shares[0] or sm == shares[-1]:
        return at(0 if sm == shares[0] else len(shares) - 1)
    if sm <= shares[0]:
        return at(0) * analytic(sm) / analytic(shares[0])
    if sm >= shares[-1]:
        return at(len(shares) - 1) * analytic(sm) / analytic(shares[-1])
    k = bisect.bisect_right(shares, sm)  # shares[k - 1] <= sm < shares[k]
    sa, sb = shares[k - 1], shares[k]
    ta = at(k - 1)
    if sm == sa:
        return ta
    w = (1 / sm - 1 / sa) / (1 / sb - 1 / sa)
    return ta + w * (at(k) - ta)


def load_profile(path: str | Path) -> ProfileTable:
    """Read a profile table; errors name the file and the dotted key."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{p}: no such profile table") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: malformed JSON at line {e.lineno}: {e.msg}") from e
    return ProfileTable(validate(ProfileFile, raw, str(p)))
