"""A does-not-fit refusal at request time, through the router: the HTTP 503 and the exception
say what the in-process engine says (the model, the bytes it needs, what is free, who holds it).

One CPU mesh serves llama (awake) and mistral (asleep), with a weights budget of 4 MiB: llama
(2.25 MiB) fits, mistral (6.76 MiB) never can, so a request for mistral is refused at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from muxserve.config import MuxConfig, parse_config
from muxserve.demo import DEMO_ENGINE
from muxserve.engine import MuxEngine
from muxserve.errors import ModelDoesNotFitError
from muxserve.router.local import LocalLauncher
from muxserve.router.router import Router
from muxserve.sampling_params import SamplingParams
from muxserve.server.app import create_app
from muxserve.server.background import BackgroundServer
from tests.router.conftest import LLAMA, MISTRAL
from tests.router.test_router_local import call

BUDGET = 4 << 20


def config(demo_models: dict[str, Path]) -> MuxConfig:
    return parse_config(
        {
            "models": [
                {"name": LLAMA, "path": str(demo_models[LLAMA])},
                {"name": MISTRAL, "path": str(demo_models[MISTRAL]), "initial_state": "asleep"},
            ],
            "engine": {**DEMO_ENGINE, "device": "cpu"},
            "meshes": [
                {
                    "name": "mesh-a",
                    "gpus": [0],
                    "models": [{"name": LLAMA}, {"name": MISTRAL}],
                    "weights_budget_bytes": BUDGET,
                }
            ],
        }
    )


def in_process_refusal(cfg: MuxConfig) -> ModelDoesNotFitError:
    eng = MuxEngine(cfg.for_mesh("mesh-a"))
    try:
        with pytest.raises(ModelDoesNotFitError) as e:
            eng.add_request(MISTRAL, [1, 2, 3], SamplingParams(max_tokens=4))
        return e.value
    finally:
        eng.shutdown()


def test_a_request_that_can_never_fit_is_a_503_with_its_numbers_through_the_router(
    demo_models: dict[str, Path],
) -> None:
    cfg = config(demo_models)
    want = in_process_refusal(cfg)
    assert want.needed_bytes > BUDGET and want.free_bytes == BUDGET and want.held_by == {}
    router = Router(cfg, LocalLauncher())
    server = BackgroundServer(create_app(router))
    server.start()  # returns once the mesh serves
    try:
        body = {"model": MISTRAL, "prompt": "Once upon a time", "max_tokens": 4}
        status, data = call(int(server.port), "POST", "/v1/completions", body)
        assert status == 503
        err = json.loads(data)["error"]
        assert err["message"] == str(want)
        assert (err["code"], err["param"], err["type"]) == (
            "model_does_not_fit",
            "model",
            "server_error",
        )

        assert router.routing.inflight() == {}  # the refusal is not counted in flight
        status, data = call(int(server.port), "POST", "/v1/completions", {**body, "model": LLAMA})
        assert status == 200, data
    finally:
        server.stop()
    assert router.meshes["mesh-a"].process.pid is None
