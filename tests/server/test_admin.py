"""POST /v1/models/{id}/sleep and /wake: states, metrics, and every refusal with its status."""

from __future__ import annotations

from pathlib import Path

import pytest

from muxserve.config import parse_config
from muxserve.demo import DEMO_ENGINE
from muxserve.engine import MuxEngine
from muxserve.sampling_params import SamplingParams
from muxserve.server import ServerSettings
from tests.helpers.server import run_app, wait_idle


def metric(text: str, prefix: str) -> float:
    """The value of the one exposition line starting with `prefix`."""
    lines = [ln for ln in text.splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, (prefix, lines)
    return float(lines[0].rsplit(" ", 1)[1])


def test_sleep_then_a_request_wakes_it_and_the_metrics_say_so(serve, engine):
    async def body(client):
        r = await client.post("/v1/models/qwen-demo/sleep", json={"level": 2})
        assert r.status == 200, await r.text()
        assert await r.json() == {
            "id": "qwen-demo",
            "object": "model.state",
            "state": "asleep",
            "wake_seconds": None,
        }
        text = await (await client.get("/metrics")).text()
        key = 'muxserve:model_state{mesh="local",model_name="qwen-demo",state='
        assert metric(text, key + '"asleep"}') == 1.0
        assert metric(text, key + '"awake"}') == 0.0
        wakes = metric(text, 'muxserve:model_wakes_total{mesh="local",model_name="qwen-demo"}')
        r = await client.post(
            "/v1/completions",
            json={"model": "qwen-demo", "prompt": "hello", "max_tokens": 4, "temperature": 0},
        )
        assert r.status == 200, await r.text()
        assert (await r.json())["usage"]["completion_tokens"] == 4
        text = await (await client.get("/metrics")).text()
        assert metric(text, key + '"awake"}') == 1.0
        after = metric(text, 'muxserve:model_wakes_total{mesh="local",model_name="qwen-demo"}')
        assert after == wakes + 1
        assert (
            metric(text, 'muxserve:model_wake_seconds_count{mesh="local",model_name="qwen-demo"}')
            == after
        )
        assert metric(text, 'muxserve:request_wake_time_seconds_count{model_name="qwen-demo"}') >= 1
        r = await client.post("/v1/models/qwen-demo/wake")
        assert r.status == 200
        assert (await r.json())["state"] == "awake"
        assert (await r.json())["wake_seconds"] == 0.0

    serve(body)


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/v1/models/nope/sleep", None, 404, "model"),
        ("/v1/models/nope/wake", None, 404, "model"),
        ("/v1/models/qwen-demo/sleep", {"level": 3}, 400, "level"),
        ("/v1/models/qwen-demo/sleep", {"level": "1"}, 400, "level"),
        ("/v1/models/qwen-demo/sleep", {"levle": 1}, 400, "levle"),
    ],
)
def test_bad_input(serve, engine, path, body, status, param):
    async def run(client):
        r = await client.post(path, json=body) if body is not None else await client.post(path)
        assert r.status == status
        assert (await r.json())["error"]["param"] == param

    serve(run)
    assert engine.model_states()["qwen-demo"].value == "awake"


def test_admin_routes_need_the_api_key(serve):
    async def run(client):
        r = await client.post("/v1/models/qwen-demo/sleep")
        assert r.status == 401
        r = await client.post("/v1/models/qwen-demo/wake")
        assert r.status == 401

    serve(run, ServerSettings(api_key="k"))


def test_sleep_with_requests_in_flight_is_409(idle_engine):
    rid = idle_engine.add_request("mistral-demo", [5, 6, 7], SamplingParams(max_tokens=2))

    async def run(client):
        r = await client.post("/v1/models/mistral-demo/sleep")
        assert r.status == 409
        err = (await r.json())["error"]
        assert err["code"] == "model_busy" and "'mistral-demo' has 1 request" in err["message"]

    try:
        run_app(idle_engine, run)
    finally:
        idle_engine.abort(rid)
    assert idle_engine.model_states()["mistral-demo"].value == "awake"


def test_a_wake_that_does_not_fit_is_503_naming_what_holds_memory(demo_models: dict[str, Path]):
    sizes_engine = MuxEngine(
        parse_config(
            {
                "models": [
                    {"name": n, "path": str(p), "initial_state": "asleep"}
                    for n, p in demo_models.items()
                ],
                "engine": DEMO_ENGINE,
            }
        )
    )
    sizes = {m: sizes_engine.executor.weight_bytes(m) for m in demo_models}
    sizes_engine.shutdown()
    config = parse_config(
        {
            "models": [
                {"name": "qwen-demo", "path": str(demo_models["qwen-demo"])},
                {
                    "name": "llama-demo",
                    "path": str(demo_models["llama-demo"]),
                    "initial_state": "asleep",
                },
            ],
            "engine": {
                **DEMO_ENGINE,
                "residency": {"weights_budget_bytes": sizes["qwen-demo"], "min_residency_s": 3600},
            },
        }
    )
    eng = MuxEngine(config)
    eng.start()

    async def run(client):
        r = await client.post("/v1/models/llama-demo/wake")
        assert r.status == 503
        err = (await r.json())["error"]
        assert err["code"] == "model_does_not_fit"
        assert "'llama-demo' does not fit" in err["message"]
        assert "held by qwen-demo" in err["message"]

    try:
        run_app(eng, run)
        wait_idle(eng)
        assert eng.model_states()["llama-demo"].value == "asleep"
    finally:
        eng.shutdown()
