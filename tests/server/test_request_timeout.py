"""engine.request_timeout_s: a request not finished in time ends with a clear timeout — an
output with finish_reason "timeout" from the engine, a 504 (or a stream's error event) over
HTTP — its blocks freed, and the model's service rate untouched by it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from muxserve.config import parse_config
from muxserve.demo import DEMO_ENGINE
from muxserve.engine import MuxEngine
from muxserve.output_processor import RequestOutput
from muxserve.sampling_params import SamplingParams
from tests.helpers.server import run_app, sse_events, wait_idle

LIMIT_S = 0.5


@pytest.fixture(scope="module")
def stuck_engine(demo_models: dict[str, Path]) -> Iterator[MuxEngine]:
    """mistral-demo with a 0.5 s request timeout, and a scheduler that never starts a job."""
    config = parse_config(
        {
            "models": [{"name": "mistral-demo", "path": str(demo_models["mistral-demo"])}],
            "engine": {**DEMO_ENGINE, "request_timeout_s": LIMIT_S},
        }
    )
    eng = MuxEngine(config)
    eng.scheduler.schedule = lambda: []  # type: ignore[method-assign]  # the model is stuck
    eng.start()
    yield eng
    eng.shutdown()


def test_a_request_past_the_timeout_ends_with_a_timeout(stuck_engine: MuxEngine) -> None:
    rid = stuck_engine.add_request("mistral-demo", [5, 6, 7], SamplingParams(max_tokens=4))

    async def read() -> list[RequestOutput]:
        return [o async for o in stuck_engine.stream(rid)]

    outs = asyncio.run(asyncio.wait_for(read(), 30.0))
    assert [(o.finished, o.finish_reason, o.token_ids) for o in outs] == [(True, "timeout", ())]
    assert outs[0].error == f"not finished within {LIMIT_S:g} s (engine.request_timeout_s)"
    wait_idle(stuck_engine)
    q = stuck_engine.scheduler.queues["mistral-demo"]
    assert q.service.rate(q.service.window) is None  # a timeout is no measure of service


def test_over_http_a_timeout_is_a_504_or_a_streamed_error(stuck_engine: MuxEngine) -> None:
    body = {"model": "mistral-demo", "prompt": "Once upon a time", "max_tokens": 4}

    async def calls(client):
        r = await client.post("/v1/completions", json=body)
        plain = (r.status, await r.json())
        r = await client.post("/v1/completions", json={**body, "stream": True})
        return plain, r.status, await sse_events(r)

    (status, payload), stream_status, events = run_app(stuck_engine, calls)
    assert status == 504
    assert payload["error"] == {
        "message": "the request timed out: not finished within 0.5 s (engine.request_timeout_s)",
        "type": "server_error",
        "param": None,
        "code": "timeout",
    }
    assert stream_status == 200  # the stream had begun: the error comes as its last event
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "timeout"
    wait_idle(stuck_engine)
