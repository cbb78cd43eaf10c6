"""One running engine over the demo models for every server test, and ways to talk to it.

pytest-aiohttp is not a dependency: `serve(body)` runs `await body(client)` against a fresh app
(over the shared engine) with aiohttp's TestClient inside `asyncio.run`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp.test_utils import TestClient, TestServer

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


@pytest.fixture(scope="session")
def engine(demo_models: dict[str, Path]) -> Iterator[MuxEngine]:
    eng = MuxEngine(demo_config(demo_models))
    eng.start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def idle_engine(demo_models: dict[str, Path]) -> Iterator[MuxEngine]:
    """mistral-demo alone, a waiting queue of one, and a loop that never runs: requests wait."""
    config = parse_config(
        {
            "models": [
                {"name": "mistral-demo", "path": str(demo_models["mistral-demo"]), "max_waiting": 1}
            ],
            "engine": DEMO_ENGINE,
        }
    )
    eng = MuxEngine(config)
    yield eng
    eng.shutdown()


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


@pytest.fixture
def serve(engine: MuxEngine) -> Iterator[Serve]:
    """`serve(body, settings=None)`: run `body(client)` against a fresh app on the shared engine.

    Afterwards the engine must be idle with every block free: no test leaks a request.
    """

    def run(body: Body[T], settings: ServerSettings | None = None) -> T:
        return run_app(engine, body, settings)

    yield run
    wait_idle(engine)


async def sse_events(resp: Any) -> list[Any]:
    """The JSON payloads of an SSE response, and "[DONE]" as a string; asserts the framing."""
    import json

    text = await resp.text()
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events
