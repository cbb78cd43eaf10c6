"""A model on two mesh processes: a request whose mesh dies before it gave any output is
answered whole by the other replica, over HTTP, with the same greedy text.

The victim mesh is stopped (SIGSTOP) before the request is sent, so that it cannot answer
anything; once the router counts the request in flight there, the mesh is killed.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from muxserve.config import parse_config
from muxserve.demo import DEMO_ENGINE
from muxserve.router.local import LocalLauncher
from muxserve.router.router import Router
from muxserve.server.app import create_app
from muxserve.server.background import BackgroundServer
from tests.router.test_router_local import (
    PROMPTS,
    completion,
    get_json,
    running,
    samples,
    wait_for,
)

LLAMA = "llama-demo"


@pytest.fixture(scope="module")
def served(demo_models: dict[str, Path]) -> Iterator[tuple[Router, int]]:
    config = parse_config(
        {
            "models": [{"name": LLAMA, "path": str(demo_models[LLAMA])}],
            "engine": {**DEMO_ENGINE, "device": "cpu"},
            "meshes": [
                {"name": "m0", "gpus": [0], "models": [{"name": LLAMA}]},
                {"name": "m1", "gpus": [1], "models": [{"name": LLAMA}]},
            ],
        }
    )
    router = Router(config, LocalLauncher())
    server = BackgroundServer(create_app(router))
    server.start()  # returns once both meshes serve
    try:
        yield router, int(server.port)
    finally:
        server.stop()


def test_a_request_lost_before_its_first_output_is_answered_by_the_other_replica(served):
    router, port = served
    status, body = completion(port, LLAMA, PROMPTS[0])
    assert status == 200, body
    want = body["choices"][0]["text"]

    victim = get_json(port, "/health")["meshes"]["m0"]["pid"]
    os.kill(victim, signal.SIGSTOP)  # m0 takes the request (both idle: the first) and stalls
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(completion, port, LLAMA, PROMPTS[0])
            wait_for("in flight on m0", lambda: router.routing.inflight().get(("m0", LLAMA)), 10)
            os.kill(victim, signal.SIGKILL)
            status, body = pending.result(timeout=60)
    finally:
        if running(victim):
            os.kill(victim, signal.SIGKILL)
    assert status == 200, body
    assert body["choices"][0]["text"] == want
    assert body["choices"][0]["finish_reason"] == "length"

    health = get_json(port, "/health")
    assert health["meshes"]["m0"]["resubmitted"] == 1
    assert health["meshes"]["m1"]["resubmitted"] == 0
    m = samples(port)  # asserts the 200
    assert m[("muxserve_mesh_requests_resubmitted_total", (("mesh", "m0"),))] == 1
    assert m[("muxserve_mesh_requests_resubmitted_total", (("mesh", "m1"),))] == 0
    assert router.routing.inflight() == {}
    # m0 comes back, and serves again
    wait_for("m0 back", lambda: get_json(port, "/health")["status"] == "ok", 60)
