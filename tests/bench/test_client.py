"""The load client against a live server on loopback: counts, timings, errors, time limits."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import aiohttp

from muxserve.bench.client import ClientOptions, replay, run_replay
from muxserve.bench.metrics import SLO, run_to_json
from muxserve.bench.workload import load_tokenizer
from tests.bench.conftest import make_trace
from tests.helpers.server import samples, value

MODELS = ("llama-demo", "qwen-demo", "mistral-demo")


def test_short_trace_counts_and_timings(server: str, demo_models: dict[str, Path]) -> None:
    prompt_tokens = len(load_tokenizer(demo_models["llama-demo"]).encode("Once upon a time").ids)
    trace = make_trace(*((0.05 * i, MODELS[i % 3], 3 + i) for i in range(9)))
    gauges = ("muxserve_kv_blocks_used", "muxserve_kv_blocks_total")
    opts = ClientOptions(url=server, ignore_eos=True, progress=False, sample_metrics=gauges)
    run = run_replay(trace, replace(opts, sample_interval_s=0.01))
    assert run.stopped is None and len(run.records) == 9 == run.trace_requests
    assert run.samples and all(
        s['muxserve_kv_blocks_total{mesh="local"}'] > 0 for _, s in run.samples
    )
    used = [
        v for _, s in run.samples for k, v in s.items() if k.startswith("muxserve_kv_blocks_used")
    ]
    assert max(used) > 0  # blocks held while requests ran
    for r, e in zip(run.records, trace.entries, strict=True):
        assert r.success, r.error
        assert (r.model, r.output_len, r.status) == (e.model, e.max_tokens, 200)
        assert r.prompt_len == prompt_tokens  # the server's count (with BOS), not the trace's
        assert r.ttft is not None and r.latency is not None and 0 < r.ttft <= r.latency
        assert len(r.itl) <= r.output_len - 1 and all(x >= 0 for x in r.itl)
        assert r.sent_s >= r.arrival_s
    data = json.loads(json.dumps(run_to_json(run, SLO.parse(["e2el:60000"]), rate=None)))
    overall = data["summary"]["overall"]
    assert (overall["requests"], overall["completed"], overall["failed"]) == (9, 9, 0)
    assert overall["output_tokens"] == sum(3 + i for i in range(9))
    assert overall["slo_attainment"] == 1.0
    per_model = {m: s["completed"] for m, s in data["summary"]["models"].items()}
    assert per_model == Counter(e.model for e in trace.entries)


def test_unknown_model_is_a_per_request_error(server: str) -> None:
    trace = make_trace((0.0, "llama-demo", 2), (0.01, "no-such-model", 2), (0.02, "qwen-demo", 2))
    run = run_replay(trace, ClientOptions(url=server, progress=False))
    assert [r.success for r in run.records] == [True, False, True]
    bad = run.records[1]
    assert bad.status == 404 and bad.error is not None and "no-such-model" in bad.error
    summary = run_to_json(run, SLO())["summary"]
    assert summary["models"]["no-such-model"]["failed"] == 1
    assert summary["overall"]["completed"] == 2


def test_chat_endpoint(server: str) -> None:
    trace = make_trace((0.0, "qwen-demo", 5))
    opts = ClientOptions(url=server, endpoint="chat", ignore_eos=True, progress=False)
    (r,) = run_replay(trace, opts).records
    assert r.success and r.output_len == 5 and r.prompt_len > 5  # the chat template's tokens


def test_time_limit_cancels_what_is_open(server: str) -> None:
    trace = make_trace((0.0, "mistral-demo", 900), (5.0, "llama-demo", 4))
    opts = ClientOptions(url=server, ignore_eos=True, progress=False, max_duration_s=0.5)
    run = run_replay(trace, opts)
    assert run.stopped == "time limit" and run.duration_s < 3
    (r,) = run.records  # the second request was never sent
    assert r.error == "cancelled: time limit" and not r.success


def test_stop_event_returns_partial_records(server: str) -> None:
    trace = make_trace((0.0, "llama-demo", 2), (0.0, "mistral-demo", 900), (30.0, "qwen-demo", 2))

    async def llama_done_mistral_running(session: aiohttp.ClientSession) -> tuple[float, float]:
        async with session.get(f"{server}/metrics") as r:
            m = samples(await r.text())
        done = sum(
            v
            for (name, labels), v in m.items()
            if name == "muxserve:request_success_total" and ("model_name", "llama-demo") in labels
        )
        return done, value(
            m, "muxserve:num_requests_running", model_name="mistral-demo", mesh="local"
        )

    async def main() -> tuple[int, list[str | None]]:
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            before, _ = await llama_done_mistral_running(session)
            task = asyncio.create_task(
                replay(trace, ClientOptions(url=server, ignore_eos=True, progress=False), stop)
            )
            deadline = time.monotonic() + 60.0
            while True:  # stop once llama's request is done and mistral's long one runs
                done, running = await llama_done_mistral_running(session)
                if done > before and running >= 1:
                    break
                assert time.monotonic() < deadline, "llama not done with mistral running in 60 s"
                await asyncio.sleep(0.01)  # between two reads of /metrics
        stop.set()
        run = await task
        return len(run.records), [r.error for r in run.records]

    sent, errors = asyncio.run(main())
    assert sent == 2 and errors == [None, "cancelled: interrupted"]


def test_unreachable_server_is_an_error_per_request() -> None:
    trace = make_trace((0.0, "llama-demo", 2))
    (r,) = run_replay(trace, ClientOptions(url="http://127.0.0.1:9", progress=False)).records
    assert not r.success and r.error is not None and "Connect" in r.error
