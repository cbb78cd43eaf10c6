"""Every error in OpenAI's shape, with the right status: 400, 401, 404, 405, 413, 429, 500."""

from __future__ import annotations

import asyncio
import logging

import pytest

from muxserve.errors import QueueFullError
from muxserve.server import ServerSettings
from muxserve.server.context import CONTEXT
from tests.helpers.server import run_app, wait_idle
from tests.helpers.wait import until

OK = {"model": "llama-demo", "prompt": "hi", "max_tokens": 2}


def check_shape(status: int, body: dict, want: int) -> dict:
    assert status == want, body
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    return err


async def post(client, path: str, **kwargs) -> tuple[int, dict]:
    r = await client.post(path, **kwargs)
    return r.status, await r.json()


@pytest.mark.parametrize(
    "path,payload,param",
    [
        ("/v1/completions", {**OK, "max_tokens": "2"}, "max_tokens"),
        ("/v1/completions", {**OK, "temperature": 9}, "temperature"),
        ("/v1/completions", {**OK, "prompt": ""}, "prompt"),
        ("/v1/completions", {**OK, "prompt": []}, "prompt"),
        ("/v1/completions", {**OK, "prompt": [10**12]}, "prompt"),
        ("/v1/completions", {**OK, "prompt": [-1]}, "prompt"),
        ("/v1/completions", {**OK, "prompt": "x " * 3000}, "prompt"),  # over the context
        ("/v1/completions", {**OK, "max_tokens": 10**30}, "max_tokens"),
        ("/v1/completions", {**OK, "prompt": ["a"] * 20, "n": 16}, "n"),
        ("/v1/completions", {**OK, "n": 2, "best_of": 1}, "best_of"),
        ("/v1/completions", {**OK, "unknown": 1}, "unknown"),
        ("/v1/chat/completions", {"model": "llama-demo", "messages": []}, "messages"),
        (
            "/v1/chat/completions",
            {"model": "llama-demo", "messages": [{"role": "user"}], "top_logprobs": 2},
            "top_logprobs",
        ),
    ],
)
def test_bad_bodies_are_400_naming_the_field(serve, path, payload, param):
    async def body(client):
        return await post(client, path, json=payload)

    err = check_shape(*serve(body), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b"[1, 2]", b"\xff\xfe\xfd"])
def test_malformed_json_is_400(serve, raw):
    async def body(client):
        return await post(client, "/v1/completions", data=raw)

    err = check_shape(*serve(body), 400)
    assert err["param"] is None


def test_unknown_model_route_and_method(serve):
    async def body(client):
        model = await post(client, "/v1/completions", json={**OK, "model": "gpt-4"})
        chat = await post(
            client,
            "/v1/chat/completions",
            json={"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]},
        )
        card = await client.get("/v1/models/gpt-4")
        route = await client.get("/v2/everything")
        method = await client.get("/v1/completions")
        return (
            model,
            chat,
            (card.status, await card.json()),
            (route.status, await route.json()),
            (method.status, await method.json()),
        )

    model, chat, card, route, method = serve(body)
    for resp in (model, chat, card):
        err = check_shape(*resp, 404)
        assert err["code"] == "model_not_found" and err["param"] == "model"
        assert "llama-demo" in err["message"]  # says what is served
    assert check_shape(*route, 404)["code"] == "not_found"
    assert check_shape(*method, 405)["code"] == "method_not_allowed"


def test_api_key(serve):
    async def body(client):
        missing = await post(client, "/v1/completions", json=OK)
        wrong = await post(
            client, "/v1/completions", json=OK, headers={"Authorization": "Bearer nope"}
        )
        models = await client.get("/v1/models", headers={"Authorization": "secret"})
        right = await client.post(
            "/v1/completions", json=OK, headers={"Authorization": "Bearer secret"}
        )
        health = await client.get("/health")  # probes need no key
        return missing, wrong, models.status, right.status, health.status

    missing, wrong, models, right, health = serve(body, ServerSettings(api_key="secret"))
    assert check_shape(*missing, 401)["code"] == "invalid_api_key"
    assert check_shape(*wrong, 401)["code"] == "invalid_api_key"
    assert (models, right, health) == (401, 200, 200)


def test_the_bearer_scheme_is_case_insensitive(serve):
    async def body(client):
        statuses = []
        for auth in ["bearer secret", "BEARER secret", "Bearer   secret", "Basic secret"]:
            r = await client.get("/v1/models", headers={"Authorization": auth})
            statuses.append(r.status)
        return statuses

    assert serve(body, ServerSettings(api_key="secret")) == [200, 200, 200, 401]


@pytest.mark.parametrize("key", ["", "  "])
def test_an_empty_api_key_is_refused(key):
    with pytest.raises(ValueError, match="the API key is empty"):
        ServerSettings(api_key=key)


def test_body_too_large(serve):
    limit = 64 << 10

    async def chunked():
        for _ in range(8):
            yield b"x" * (16 << 10)

    async def body(client):
        declared = await post(client, "/v1/completions", data=b"{" + b" " * limit + b"}")
        streamed = await post(client, "/v1/completions", data=chunked())
        fine = await client.post("/v1/completions", json=OK)
        return declared, streamed, fine.status

    declared, streamed, fine = serve(body, ServerSettings(max_body_bytes=limit))
    assert check_shape(*declared, 413)["code"] == "request_too_large"
    assert check_shape(*streamed, 413)["code"] == "request_too_large"
    assert fine == 200


def test_full_queue_is_429_and_a_gone_client_leaves_the_queue(idle_engine):
    """The idle engine never runs: its one waiting slot fills, the next request gets 429."""
    chat = {
        "model": "mistral-demo",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 2,
    }

    async def body(client):
        waiting = asyncio.create_task(client.post("/v1/chat/completions", json=chat))
        await until(lambda: idle_engine.stats()["mistral-demo"].waiting > 0, 10, "a waiting one")
        full = await client.post("/v1/chat/completions", json=chat)
        result = full.status, dict(full.headers), await full.json()
        waiting.cancel()  # the client goes away: its request leaves the queue
        await until(lambda: not idle_engine.has_work(), 5, "the queue to empty")
        return result

    status, headers, payload = run_app(idle_engine, body)
    err = check_shape(status, payload, 429)
    assert (err["type"], err["code"]) == ("rate_limit_error", "queue_full")
    assert headers["Retry-After"] == "1"
    wait_idle(idle_engine)


def test_a_429_says_when_to_retry_from_the_queue(serve, engine):
    """Retry-After is the engine's estimate of the queue's wait, not a constant."""

    async def body(client):
        ctx = client.server.app[CONTEXT]

        async def full(*args, **kwargs):
            raise QueueFullError("llama-demo: 40 requests already waiting", "model", 17)

        async def nothing(*args):
            return None

        ctx.client = type(
            "Full",
            (),
            {
                "models": engine.models,
                "add_request": full,
                "abort": engine.abort,
                "shutdown": nothing,
            },
        )()
        r = await client.post("/v1/completions", json=OK)
        return r.status, r.headers["Retry-After"], await r.json()

    status, retry_after, payload = serve(body)
    assert (status, retry_after) == (429, "17")
    assert payload["error"] == {
        "message": "llama-demo: 40 requests already waiting",
        "type": "rate_limit_error",
        "param": "model",
        "code": "queue_full",
    }


def test_unexpected_errors_are_500_in_the_openai_shape_and_logged(serve, engine, caplog):
    async def body(client):
        ctx = client.server.app[CONTEXT]

        async def broken(*args, **kwargs):
            raise RuntimeError("boom")

        async def nothing(*args):
            return None

        ctx.client = type(
            "Broken",
            (),
            {
                "models": engine.models,
                "add_request": broken,
                "abort": engine.abort,
                "shutdown": nothing,
            },
        )()
        return await post(client, "/v1/completions", json=OK)

    with caplog.at_level(logging.ERROR, logger="muxserve.server.errors"):
        err = check_shape(*serve(body), 500)
    assert err["type"] == "server_error" and "boom" not in err["message"]
    assert any("boom" in r.exc_text for r in caplog.records if r.exc_text)
