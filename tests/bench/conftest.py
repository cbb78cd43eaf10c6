"""A live server over the demo models on loopback (a thread of this process), and traces."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from muxserve.bench.trace import Trace, TraceEntry
from muxserve.client.in_process import InProcessClient
from muxserve.config import parse_config
from muxserve.demo import DEMO_ENGINE
from muxserve.engine import MuxEngine
from muxserve.server import create_app
from muxserve.server.background import BackgroundServer
from tests.helpers.server import wait_idle


@pytest.fixture(scope="session")
def live(demo_models: dict[str, Path]) -> Iterator[tuple[str, MuxEngine]]:
    """(base URL, engine) of a server that runs for the whole session."""
    config = parse_config(
        {
            "models": [{"name": n, "path": str(p)} for n, p in demo_models.items()],
            "engine": DEMO_ENGINE,
        }
    )
    engine = MuxEngine(config)
    with BackgroundServer(create_app(InProcessClient(engine))) as url:
        yield url, engine


@pytest.fixture
def server(live: tuple[str, MuxEngine]) -> Iterator[str]:
    """The live server's URL; afterwards no request may be left and every block is free."""
    url, engine = live
    yield url
    wait_idle(engine, timeout=10.0)


def make_trace(*items: tuple[float, str, int], prompt: str = "Once upon a time") -> Trace:
    """A trace from (arrival_s, model, max_tokens) triples."""
    entries = tuple(TraceEntry(t, m, prompt, 4, n) for t, m, n in items)
    return Trace(entries, {"nominal_duration_s": max(t for t, _, _ in items) or 1.0})
