"""The server tests' config, waits and ways to talk to an app over an engine."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from muxserve.client.in_process import InProcessClient
from muxserve.config import MuxConfig, parse_config
from muxserve.demo import DEMO_ENGINE, DEMO_RATES
from muxserve.engine import MuxEngine
from muxserve.server import ServerSettings, create_app
from muxserve.server.connection import AppRunner

T = TypeVar("T")
Body = Callable[[TestClient], Awaitable[T]]
Serve = Callable[..., Any]


def demo_config(demo_models: dict[str, Path], **model_fields: Any) -> MuxConfig:
    """The demo config (as `muxserve serve` with no arguments uses), fields added per model."""
    models = [
        {"name": n, "path": str(p), "rate": DEMO_RATES[n], **model_fields}
        for n, p in demo_models.items()
    ]
    return parse_config({"models": models, "engine": DEMO_ENGINE})


def wait_idle(engine: MuxEngine, timeout: float = 5.0) -> None:
    """Wait until no request is left and every KV block is free (aborts land within a step)."""
    deadline = time.monotonic() + timeout
    pool = engine.scheduler.pool
    while engine.has_work() or pool.num_free != pool.num_blocks:
        assert time.monotonic() < deadline, f"engine still busy: {engine.stats()}"
        time.sleep(0.01)
    engine.check_integrity()


class MuxTestServer(TestServer):
    """aiohttp's TestServer over the runner `muxserve serve` uses (its connection handler)."""

    async def _make_runner(self, **kwargs: Any) -> AppRunner:
        return AppRunner(self.app, **kwargs)


def run_app(engine: MuxEngine, body: Body[T], settings: ServerSettings | None = None) -> T:
    async def main() -> T:
        app = create_app(InProcessClient(engine, manage=False), settings)
        async with TestClient(MuxTestServer(app)) as client:
            return await body(client)

    return asyncio.run(main())


async def sse_events(resp: Any) -> list[Any]:
    """The JSON payloads of an SSE response, and "[DONE]" as a string; asserts the framing."""
    text = await resp.text()
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)
