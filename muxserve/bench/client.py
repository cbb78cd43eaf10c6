"""The load client: replays a trace against an OpenAI-compatible endpoint, streaming.

Each request is sent at its arrival time (open loop: a slow server does not slow the
arrivals) and read as server-sent events; the client stamps the first token, every later
chunk and the end. Measurements follow vLLM's `bench serve` so numbers compare: see
`muxserve.bench.metrics`. A failed request (HTTP error, error event, broken connection) is a
record with `error` set, never an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
from tqdm import tqdm

from muxserve.bench.probe import Sample, sample_metrics
from muxserve.bench.trace import Trace, TraceEntry

Endpoint = Literal["completions", "chat"]
PATHS: dict[str, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass
class RequestRecord:
    """What happened to one request; times are seconds."""

    index: int  # position in the trace
    model: str
    arrival_s: float  # when the trace says it arrives, from the start of the run
    sent_s: float  # when it was sent, from the start of the run
    prompt_len: int  # the server's count (usage) where given, else the trace's
    output_len: int = 0  # the server's count (usage) where given, else text chunks
    ttft: float | None = None  # first text chunk - send
    itl: list[float] = field(default_factory=list)  # gaps between successive text chunks
    latency: float | None = None  # end of the response - send (E2EL)
    error: str | None = None
    status: int | None = None  # HTTP status

    @property
    def success(self) -> bool:
        return self.error is None and self.latency is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "model": self.model,
            "arrival_s": round(self.arrival_s, 6),
            "sent_s": round(self.sent_s, 6),
            "prompt_len": self.prompt_len,
            "output_len": self.output_len,
            "ttft": self.ttft,
            "itl": [round(x, 6) for x in self.itl],
            "latency": self.latency,
            "error": self.error,
            "status": self.status,
        }


@dataclass
class RunResult:
    """One replay: the records of every request sent, and how the run ended."""

    records: list[RequestRecord]
    duration_s: float  # from the first send to the last response (or to the stop)
    trace_requests: int  # requests the (bounded) trace held
    stopped: str | None = None  # "interrupted", "time limit", or None: ran to the end
    started_at: float = 0.0  # wall clock (time.time()) at the start
    load_avg: tuple[float, float, float] = (0.0, 0.0, 0.0)  # os.getloadavg() at the end
    samples: list[Sample] = field(default_factory=list)  # the server's gauges over time


@dataclass(frozen=True)
class ClientOptions:
    """How requests are sent."""

    url: str  # base URL, e.g. http://127.0.0.1:8000
    endpoint: Endpoint = "completions"
    api_key: str | None = None
    ignore_eos: bool = False  # vLLM's extension: exactly max_tokens tokens each
    temperature: float = 0.0
    max_duration_s: float | None = None  # stop sending, and cancel what runs, after this
    max_concurrency: int | None = None  # at most this many requests open at once
    progress: bool = True
    label: str = "bench"
    sample_metrics: tuple[str, ...] = ()  # Prometheus gauges to sample from /metrics
    sample_interval_s: float = 0.1


def request_body(entry: TraceEntry, opts: ClientOptions) -> dict[str, Any]:
    """The JSON body of one request, streamed with usage at the end."""
    body: dict[str, Any] = {
        "model": entry.model,
        "max_tokens": entry.max_tokens,
        "temperature": opts.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if opts.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": entry.prompt}]
    else:
        body["prompt"] = entry.prompt
    if opts.ignore_eos:
        body["ignore_eos"] = True
    return body


def _chunk_text(data: dict[str, Any], endpoint: Endpoint) -> str:
    choices = data.get("choices") or []
    if not choices:
        return ""
    if endpoint == "chat":
        return str((choices[0].get("delta") or {}).get("content") or "")
    return str(choices[0].get("text") or "")


async def send_one(
    session: aiohttp.ClientSession,
    entry: TraceEntry,
    rec: RequestRecord,
    opts: ClientOptions,
    t0: float,
) -> None:
    """Send one request and fill `rec` as its events arrive."""
    headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    url = opts.url.rstrip("/") + PATHS[opts.endpoint]
    start = time.perf_counter()
    rec.sent_s = start - t0
    last: float | None = None
    chunks = 0
    try:
        async with session.post(url, json=request_body(entry, opts), headers=headers) as resp:
            rec.status = resp.status
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {_error_message(await resp.text())}"
                return
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                now = time.perf_counter()
                data = json.loads(payload)
                if "error" in data:
                    rec.error = f"error event: {_error_message(json.dumps(data))}"
                    return
                if _chunk_text(data, opts.endpoint):
                    if last is None:
                        rec.ttft = now - start
                    else:
                        rec.itl.append(now - last)
                    last = now
                    chunks += 1
                usage = data.get("usage")
                if usage:
                    rec.output_len = int(usage.get("completion_tokens") or 0)
                    rec.prompt_len = int(usage.get("prompt_tokens") or rec.prompt_len)
            rec.latency = time.perf_counter() - start
            if not rec.output_len:
                rec.output_len = chunks
    except (aiohttp.ClientError, json.JSONDecodeError, OSError) as e:
        rec.error = f"{type(e).__name__}: {e}"


def _error_message(text: str) -> str:
    """The `error.message` of an OpenAI error body, else the text itself (shortened)."""
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
    except (ValueError, AttributeError):
        pass
    return text[:300]


async def replay(trace: Trace, opts: ClientOptions, stop: asyncio.Event | None = None) -> RunResult:
    """Send every request of `trace` at its arrival time; wait for all, or until stopped.

    `stop` (or the time limit) ends the run early: nothing more is sent, requests still open
    are cancelled and recorded with an error, and the records so far are returned.
    """
    stop = stop or asyncio.Event()
    records: list[RequestRecord] = []
    tasks: set[asyncio.Task[None]] = set()
    limit = asyncio.Semaphore(opts.max_concurrency) if opts.max_concurrency else None
    bar = tqdm(
        total=len(trace.entries),
        desc=opts.label,
        unit="req",
        file=sys.stderr,
        disable=not opts.progress,
        dynamic_ncols=True,
    )
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None)
    started_at = time.time()
    t0 = time.perf_counter()
    deadline = t0 + opts.max_duration_s if opts.max_duration_s else None
    stopped: str | None = None

    async def run_one(entry: TraceEntry, rec: RequestRecord) -> None:
        if limit is None:
            await send_one(session, entry, rec, opts, t0)
        else:
            async with limit:
                await send_one(session, entry, rec, opts, t0)
        bar.update()

    async def wait_until(when: float) -> bool:
        """Sleep until `when` (perf_counter); False if stopped or past the deadline first."""
        end = when if deadline is None else min(when, deadline)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, end - time.perf_counter()))
        return not stop.is_set() and (deadline is None or time.perf_counter() < deadline)

    samples: list[Sample] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        probe = None
        if opts.sample_metrics:
            probe = asyncio.create_task(
                sample_metrics(
                    session, opts.url, opts.sample_metrics, opts.sample_interval_s, t0, samples
                )
            )
        for i, entry in enumerate(trace.entries):
            if not await wait_until(t0 + entry.arrival_s):
                break
            rec = RequestRecord(i, entry.model, entry.arrival_s, 0.0, entry.prompt_len)
            records.append(rec)
            task = asyncio.create_task(run_one(entry, rec))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        stopper = asyncio.ensure_future(stop.wait())
        while tasks and not stop.is_set():
            left = None if deadline is None else deadline - time.perf_counter()
            if left is not None and left <= 0:
                break
            await asyncio.wait([*tasks, stopper], timeout=left, return_when="FIRST_COMPLETED")
        stopper.cancel()
        if stop.is_set():
            stopped = "interrupted"
        elif deadline is not None and (tasks or len(records) < len(trace.entries)):
            stopped = "time limit"
        for task in [*tasks, *([probe] if probe is not None else [])]:
            task.cancel()
        await asyncio.gather(
            *tasks, *([probe] if probe is not None else []), return_exceptions=True
        )
    duration = time.perf_counter() - t0
    bar.close()
    for rec in records:
        if rec.error is None and rec.latency is None:
            rec.error = f"cancelled: {stopped}"
    load = os.getloadavg()
    return RunResult(records, duration, len(trace.entries), stopped, started_at, load, samples)


def run_replay(trace: Trace, opts: ClientOptions) -> RunResult:
    """`replay` on a new event loop; SIGINT or SIGTERM stop it and return what was measured.

    A second signal is not caught: it interrupts at once.
    """

    async def main() -> RunResult:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        sigs = (signal.SIGINT, signal.SIGTERM)

        def on_signal() -> None:
            stop.set()
            for s in sigs:
                loop.remove_signal_handler(s)

        for s in sigs:
            loop.add_signal_handler(s, on_signal)
        try:
            return await replay(trace, opts, stop)
        finally:
            for s in sigs:
                loop.remove_signal_handler(s)

    return asyncio.run(main())
