"""A workload trace: one JSON object per line, each a request and when it arrives.

    {"arrival_s": 0.42, "model": "llama-demo", "prompt": "...", "prompt_len": 57, "max_tokens": 64}

An optional first line `{"meta": {...}}` records how the trace was made (readers skip it;
`nominal_duration_s` there is the span the arrival process covers).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TraceEntry:
    """One request of a trace."""

    arrival_s: float  # seconds from the start of the run
    model: str  # the `model` field of the request
    prompt: str
    prompt_len: int  # prompt tokens the generator aimed at (the server's count may differ)
    max_tokens: int  # output tokens asked for


@dataclass(frozen=True)
class Trace:
    """Requests in arrival order, and what made them."""

    entries: tuple[TraceEntry, ...]
    meta: dict[str, Any]

    @property
    def duration_s(self) -> float:
        """The span the arrivals cover: the generator's duration, else the last arrival."""
        nominal = self.meta.get("nominal_duration_s")
        if isinstance(nominal, (int, float)) and nominal > 0:
            return float(nominal)
        return max((e.arrival_s for e in self.entries), default=0.0)

    @property
    def rate(self) -> float:
        """Mean offered load in requests/s."""
        span = self.duration_s
        return len(self.entries) / span if span > 0 else float("inf")

    def models(self) -> list[str]:
        """Model names: the generator's order (most popular first), then by first appearance."""
        seen = dict.fromkeys(e.model for e in self.entries)
        listed = [m for m in self.meta.get("models", []) if m in seen]
        return listed + [m for m in seen if m not in listed]

    def head(self, n: int | None) -> Trace:
        """The first `n` requests (all of them for None)."""
        if n is None or n >= len(self.entries):
            return self
        return Trace(self.entries[:n], self.meta)

    def at_rate(self, rate: float) -> Trace:
        """The same requests with arrival times scaled so the mean rate is `rate` req/s.

        Every feature of the arrival process (bursts, ramps) keeps its shape, compressed or
        stretched in time: the way the MuxServe paper sweeps rates over one workload.
        """
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        factor = self.rate / rate
        entries = tuple(replace(e, arrival_s=e.arrival_s * factor) for e in self.entries)
        meta = {**self.meta, "nominal_duration_s": self.duration_s * factor, "rate": rate}
        return Trace(entries, meta)


def write_trace(path: str | Path, entries: Sequence[TraceEntry], meta: dict[str, Any]) -> None:
    """Write a trace as JSONL, the meta line first."""
    lines = [json.dumps({"meta": meta})]
    lines += [json.dumps(asdict(e), ensure_ascii=False) for e in entries]
    Path(path).write_text("\n".join(lines) + "\n")


def read_trace(path: str | Path) -> Trace:
    """Read a JSONL trace; a bad line is a ValueError naming the file and line."""
    p = Path(path)
    entries: list[TraceEntry] = []
    meta: dict[str, Any] = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if "meta" in obj:
                meta = dict(obj["meta"])
                continue
            entries.append(
                TraceEntry(
                    arrival_s=float(obj["arrival_s"]),
                    model=str(obj["model"]),
                    prompt=str(obj["prompt"]),
                    prompt_len=int(obj.get("prompt_len", 0)),
                    max_tokens=int(obj["max_tokens"]),
                )
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{p}:{n}: not a trace entry ({e!r})") from e
    entries.sort(key=lambda e: e.arrival_s)
    return Trace(tuple(entries), meta)
