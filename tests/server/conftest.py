"""One running engine over the demo models for every server test, and ways to talk to it.

pytest-aiohttp is not a dependency: `serve(body)` runs `await body(client)` against a fresh app
(over the shared engine) with aiohttp's TestClient inside `asyncio.run`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from muxserve.config import parse_config
from muxserve.demo import DEMO_ENGINE
from muxserve.engine import MuxEngine
from muxserve.server import ServerSettings
from tests.helpers.server import Body, Serve, T, demo_config, run_app, wait_idle


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


@pytest.fixture
def serve(engine: MuxEngine) -> Iterator[Serve]:
    """`serve(body, settings=None)`: run `body(client)` against a fresh app on the shared engine.

    Afterwards the engine must be idle with every block free: no test leaks a request.
    """

    def run(body: Body[T], settings: ServerSettings | None = None) -> T:
        return run_app(engine, body, settings)

    yield run
    wait_idle(engine)
