"""Samples a server's Prometheus gauges while a benchmark runs (e.g. KV blocks per model).

Works with any server exposing `/metrics` in the Prometheus text format; a failed scrape is
skipped, never an error of the benchmark.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import aiohttp

Sample = tuple[float, dict[str, float]]  # (seconds from the start, series -> value)


def parse_prometheus(text: str, names: Sequence[str]) -> dict[str, float]:
    """The values of the series whose metric name is in `names`, keyed as written
    (`name{label="value"}`); comments and other metrics are skipped."""
    wanted = set(names)
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        if series.split("{", 1)[0] in wanted:
            try:
                out[series] = float(value)
            except ValueError:
                continue
    return out


async def sample_metrics(
    session: aiohttp.ClientSession,
    url: str,
    names: Sequence[str],
    interval_s: float,
    t0: float,
    samples: list[Sample],
) -> None:
    """Append a sample of `names` every `interval_s` until cancelled."""
    endpoint = url.rstrip("/") + "/metrics"
    while True:
        try:
            async with session.get(endpoint) as resp:
                if resp.status == 200:
                    values = parse_prometheus(await resp.text(), names)
                    samples.append((time.perf_counter() - t0, values))
        except (aiohttp.ClientError, OSError):
            pass
        await asyncio.sleep(interval_s)


def peak_and_mean(samples: Sequence[Sample], series: str) -> tuple[float, float] | None:
    """The largest and the mean value of one series over the samples (None if never seen)."""
    vals = [s[series] for _, s in samples if series in s]
    if not vals:
        return None
    return max(vals), sum(vals) / len(vals)


async def probe_endpoint(
    url: str, path: str, body: dict[str, object], api_key: str | None, timeout_s: float = 60.0
) -> str | None:
    """Send one request before a benchmark; None if it answered 200, else why not (so a
    wrong URL, model or key fails at once with the server's own message, not N times)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.post(url.rstrip("/") + path, json=body, headers=headers) as resp,
        ):
            text = await resp.text()
            if resp.status == 200:
                return None
            return f"HTTP {resp.status}: {text.strip()[:500]}"
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        return f"{type(e).__name__}: {e}"
