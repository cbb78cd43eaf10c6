"""A client that goes away aborts its requests: KV blocks are free at once, streaming or not."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.helpers.server import wait_idle
from tests.helpers.wait import until

LONG = {
    "model": "mistral-demo",
    "prompt": "Once",
    "max_tokens": 1000,
    "temperature": 0,
    "ignore_eos": True,
}  # ~1000 decode steps: far longer than any of these tests waits


def aborted(engine_metrics_text: str) -> float:
    for line in engine_metrics_text.splitlines():
        if line.startswith(
            'muxserve:request_success_total{finished_reason="abort",model_name="mistral-demo"}'
        ):
            return float(line.split()[-1])
    return 0.0


async def until_running(engine, n: int = 1) -> None:
    await until(lambda: engine.stats()["mistral-demo"].running >= n, 30, f"{n} running")


async def until_idle(engine) -> None:
    await until(lambda: not engine.has_work(), 3, "the aborts")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streaming_client_disconnect_aborts(serve, engine, path):
    payload = dict(LONG)
    if path.endswith("chat/completions"):
        payload["messages"] = [{"role": "user", "content": payload.pop("prompt")}]

    async def body(client):
        r = await client.post(path, json={**payload, "stream": True, "n": 2})
        await r.content.readuntil(b"\n\n")  # the stream is under way
        await until_running(engine, 2)
        assert engine.stats()["mistral-demo"].blocks_used > 0
        r.close()  # drop the connection mid-stream
        await until_idle(engine)
        return await (await client.get("/metrics")).text()

    metrics = serve(body)
    wait_idle(engine, timeout=0.5)  # at once: not after the 1000 tokens
    assert aborted(metrics) == 2


def test_non_streaming_client_disconnect_aborts(serve, engine):
    async def body(client):
        task = asyncio.create_task(client.post("/v1/completions", json=LONG))
        await until_running(engine)
        task.cancel()  # the client gives up before the response
        with pytest.raises(asyncio.CancelledError):
            await task
        await until_idle(engine)
        return await (await client.get("/metrics")).text()

    metrics = serve(body)
    wait_idle(engine, timeout=0.5)
    assert aborted(metrics) == 1


def test_client_timeout_aborts(serve, engine):
    async def body(client):
        with pytest.raises(asyncio.TimeoutError):
            await client.post(
                "/v1/completions", json=LONG, timeout=aiohttp.ClientTimeout(total=0.3)
            )
        await until_idle(engine)

    serve(body)
    wait_idle(engine, timeout=0.5)
