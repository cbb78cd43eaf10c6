"""Serving metrics from request records, defined as vLLM's `bench serve` defines them.

- TTFT: first token's arrival - send.
- TPOT: (E2EL - TTFT) / (output tokens - 1), for requests with more than one output token.
- ITL: every gap between successive token chunks (a chunk may hold more than one token).
- E2EL: end of the response - send.
- Request / output / total token throughput: completed requests, output tokens, input +
  output tokens, over the run's duration (first send to last response).
- Goodput: completed requests per second that meet every given SLO (a request with one
  output token has TPOT 0 for this check, as in vLLM).
- SLO attainment (the MuxServe paper's measure): requests meeting every SLO / requests
  sent; failed and cancelled requests count as misses.

Percentiles are numpy's linear interpolation (as vLLM's), reported in milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from muxserve.bench.client import RequestRecord, RunResult

PERCENTILES = (50, 90, 99)
SLO_KEYS = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class SLO:
    """Latency objectives in seconds; None: not checked."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2el_s: float | None = None

    @classmethod
    def parse(cls, specs: Sequence[str]) -> SLO:
        """From `KEY:MS` strings, as vLLM's --goodput takes them: `ttft:500 tpot:50`."""
        vals: dict[str, float] = {}
        for spec in specs:
            key, _, ms = spec.partition(":")
            if key not in SLO_KEYS:
                raise ValueError(f"SLO {spec!r}: the key must be one of {', '.join(SLO_KEYS)}")
            try:
                vals[f"{key}_s"] = float(ms) / 1000
            except ValueError:
                raise ValueError(f"SLO {spec!r}: give milliseconds, e.g. {key}:500") from None
            if vals[f"{key}_s"] <= 0:
                raise ValueError(f"SLO {spec!r}: must be positive")
        return cls(**vals)

    @property
    def empty(self) -> bool:
        return self.ttft_s is None and self.tpot_s is None and self.e2el_s is None

    def met(self, rec: RequestRecord) -> bool:
        """Whether a request completed within every objective."""
        if not rec.success:
            return False
        if self.ttft_s is not None and (rec.ttft is None or rec.ttft > self.ttft_s):
            return False
        if self.tpot_s is not None and (tpot(rec) or 0.0) > self.tpot_s:
            return False
        return self.e2el_s is None or (rec.latency is not None and rec.latency <= self.e2el_s)

    def to_json(self) -> dict[str, float]:
        pairs = [("ttft_ms", self.ttft_s), ("tpot_ms", self.tpot_s), ("e2el_ms", self.e2el_s)]
        return {k: v * 1000 for k, v in pairs if v is not None}


def tpot(rec: RequestRecord) -> float | None:
    """Time per output token after the first; None below two tokens or on failure."""
    if not rec.success or rec.ttft is None or rec.latency is None or rec.output_len < 2:
        return None
    return (rec.latency - rec.ttft) / (rec.output_len - 1)


def latency_stats(xs: Sequence[float]) -> dict[str, float | None]:
    """Mean, standard deviation and percentiles of seconds, in milliseconds."""
    if not xs:
        return {"mean": None, "std": None, **{f"p{q}": None for q in PERCENTILES}}
    a = np.asarray(xs, dtype=np.float64) * 1000
    out: dict[str, float | None] = {"mean": float(a.mean()), "std": float(a.std())}
    for q in PERCENTILES:
        out[f"p{q}"] = float(np.percentile(a, q))
    return out


def summarize_group(records: Sequence[RequestRecord], duration_s: float, slo: SLO) -> dict:
    """Every metric over `records` (all of one model, or all of a run)."""
    done = [r for r in records if r.success]
    dur = max(duration_s, 1e-9)
    inp = sum(r.prompt_len for r in done)
    out = sum(r.output_len for r in done)
    good = sum(slo.met(r) for r in records) if not slo.empty else None
    return {
        "requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "input_tokens": inp,
        "output_tokens": out,
        "request_throughput": len(done) / dur,
        "output_throughput": out / dur,
        "total_token_throughput": (inp + out) / dur,
        "goodput": None if good is None else good / dur,
        "slo_attainment": None if good is None or not records else good / len(records),
        "ttft_ms": latency_stats([r.ttft for r in done if r.ttft is not None]),
        "tpot_ms": latency_stats([t for r in done if (t := tpot(r)) is not None]),
        "itl_ms": latency_stats([x for r in done for x in r.itl]),
        "e2el_ms": latency_stats([r.latency for r in done if r.latency is not None]),
    }


def summarize(records: Sequence[RequestRecord], duration_s: float, slo: SLO) -> dict:
    """`{"overall": ..., "models": {name: ...}}`; per-model throughputs use the run's duration,
    so they add up to the overall ones."""
    models = list(dict.fromkeys(r.model for r in records))
    return {
        "overall": summarize_group(records, duration_s, slo),
        "models": {
            m: summarize_group([r for r in records if r.model == m], duration_s, slo)
            for m in models
        },
    }


def errors_by_kind(records: Sequence[RequestRecord], limit: int = 5) -> dict[str, int]:
    """The most common error messages and how often each occurred."""
    counts: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            counts[r.error] = counts.get(r.error, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:limit])


def run_to_json(
    run: RunResult, slo: SLO, *, rate: float | None = None, requests: bool = True
) -> dict[str, Any]:
    """A run as JSON: how it went, the summary, and (unless told not to) every request."""
    out: dict[str, Any] = {
        "rate": rate,
        "duration_s": run.duration_s,
        "trace_requests": run.trace_requests,
        "sent": len(run.records),
        "stopped": run.stopped,
        "started_at": run.started_at,
        "load_avg": list(run.load_avg),
        "slo": slo.to_json(),
        "summary": summarize(run.records, run.duration_s, slo),
        "errors": errors_by_kind(run.records),
    }
    if requests:
        out["requests"] = [r.to_json() for r in run.records]
        if run.samples:
            out["metric_samples"] = [[round(t, 3), vals] for t, vals in run.samples]
    return out
