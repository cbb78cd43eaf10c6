"""/v1/models and /v1/completions over the real engine: parity, batches, n, stop, logprobs, SSE."""

from __future__ import annotations

import pytest

from muxserve.sampling_params import SamplingParams
from tests.helpers.server import sse_events

MODELS = ["llama-demo", "qwen-demo", "mistral-demo"]


def test_list_models(serve, engine):
    async def body(client):
        r = await client.get("/v1/models")
        one = await client.get("/v1/models/qwen-demo")
        return r.status, await r.json(), one.status, await one.json()

    status, data, one_status, one = serve(body)
    assert status == 200 and data["object"] == "list"
    assert [m["id"] for m in data["data"]] == MODELS
    assert all(m["object"] == "model" and m["owned_by"] == "muxserve" for m in data["data"])
    assert data["data"][0]["max_model_len"] == engine.models["llama-demo"].max_model_len
    assert one_status == 200 and one["id"] == "qwen-demo"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("stream", [False, True])
def test_greedy_text_equals_offline_generate(serve, engine, model, stream):
    prompt = "Once upon a time"
    [offline] = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0), model)

    async def body(client):
        req = {
            "model": model,
            "prompt": prompt,
            "max_tokens": 12,
            "temperature": 0,
            "stream": stream,
        }
        r = await client.post("/v1/completions", json=req)
        assert r.status == 200
        if not stream:
            return await r.json()
        events = await sse_events(r)
        return {
            "choices": [
                {
                    "text": "".join(e["choices"][0]["text"] for e in events[:-1]),
                    "finish_reason": events[-2]["choices"][0]["finish_reason"],
                }
            ]
        }

    out = serve(body)
    assert out["choices"][0]["text"] == offline.text
    assert out["choices"][0]["finish_reason"] == offline.finish_reason
    if not stream:
        assert out["usage"] == {
            "prompt_tokens": len(offline.prompt_token_ids),
            "completion_tokens": len(offline.token_ids),
            "total_tokens": len(offline.prompt_token_ids) + len(offline.token_ids),
        }
        assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")


def test_token_ids_and_batches(serve, engine):
    ids = [[5, 6, 7, 8], [9, 10]]
    offline = engine.generate(ids, SamplingParams(max_tokens=4, temperature=0.0), "qwen-demo")

    async def body(client):
        one = await client.post(
            "/v1/completions",
            json={"model": "qwen-demo", "prompt": ids[0], "max_tokens": 4, "temperature": 0},
        )
        batch = await client.post(
            "/v1/completions",
            json={"model": "qwen-demo", "prompt": ids, "max_tokens": 4, "temperature": 0, "n": 2},
        )
        return await one.json(), await batch.json()

    one, batch = serve(body)
    assert one["choices"][0]["text"] == offline[0].text
    # choice i*n + j: prompt i, sample j
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in batch["choices"]] == [offline[0].text] * 2 + [offline[1].text] * 2
    assert batch["usage"]["prompt_tokens"] == 6  # each prompt once
    assert batch["usage"]["completion_tokens"] == 2 * sum(len(c.token_ids) for c in offline)


def test_seeded_sampling_is_reproducible(serve):
    req = {
        "model": "llama-demo",
        "prompt": "The weather",
        "max_tokens": 8,
        "temperature": 1.0,
        "top_p": 0.9,
        "top_k": 50,
        "seed": 1234,
        "n": 3,
    }

    async def body(client):
        a = await (await client.post("/v1/completions", json=req)).json()
        b = await (await client.post("/v1/completions", json=req)).json()
        return [c["text"] for c in a["choices"]], [c["text"] for c in b["choices"]]

    a, b = serve(body)
    assert a == b
    assert len(set(a)) > 1  # choices get seeds 1234, 1235, 1236


def test_stop_and_length(serve, engine):
    [free] = engine.generate(
        ["Once upon a time"], SamplingParams(max_tokens=20, temperature=0.0), "mistral-demo"
    )
    stop = next(
        free.text[i : i + 2] for i in range(3, len(free.text)) if free.text[i : i + 2].strip()
    )
    first = free.text.find(stop)

    async def body(client):
        req = {
            "model": "mistral-demo",
            "prompt": "Once upon a time",
            "max_tokens": 20,
            "temperature": 0,
        }
        stopped = await client.post("/v1/completions", json={**req, "stop": [stop]})
        short = await client.post("/v1/completions", json={**req, "max_tokens": 3})
        return await stopped.json(), await short.json()

    stopped, short = serve(body)
    assert stopped["choices"][0]["text"] == free.text[:first]
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert short["choices"][0]["finish_reason"] == "length"
    assert short["usage"]["completion_tokens"] == 3


def test_logprobs_shape(serve):
    async def body(client):
        r = await client.post(
            "/v1/completions",
            json={
                "model": "llama-demo",
                "prompt": "Hello",
                "max_tokens": 5,
                "temperature": 0,
                "logprobs": 3,
            },
        )
        return await r.json()

    choice = serve(body)["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert lp["text_offset"][0] == 0
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(5)]
    for value, top in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert 1 <= len(top) <= 3  # distinct token texts among the top 3
        assert value == pytest.approx(max(top.values()))  # greedy: the most likely token


def test_stream_with_usage(serve):
    req = {
        "model": "qwen-demo",
        "prompt": ["Hi", "Bye"],
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 1,
    }

    async def body(client):
        whole = await (await client.post("/v1/completions", json=req)).json()
        r = await client.post(
            "/v1/completions",
            json={**req, "stream": True, "stream_options": {"include_usage": True}},
        )
        assert r.headers["Content-Type"].startswith("text/event-stream")
        return whole, await sse_events(r)

    whole, events = serve(body)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    chunks = events[:-2]
    for i, choice in enumerate(whole["choices"]):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert [c["finish_reason"] for c in mine][-1] == "length"
        assert all(c["finish_reason"] is None for c in mine[:-1])
        tokens = [t for c in mine for t in c["logprobs"]["tokens"]]
        assert tokens == choice["logprobs"]["tokens"]
        offsets = [t for c in mine for t in c["logprobs"]["text_offset"]]
        assert offsets == choice["logprobs"]["text_offset"]  # offsets run on across chunks
    assert len({c["id"] for c in chunks}) == 1
