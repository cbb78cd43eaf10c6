"""/v1/chat/completions over the real engine: template parity, SSE shape, logprobs, limits."""

from __future__ import annotations

import pytest

from muxserve.sampling_params import SamplingParams
from tests.helpers.server import sse_events

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me a story."},
]


def offline_chat(engine, model, messages, max_tokens):
    tok = engine.models[model].tokenizer
    ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    [c] = engine.generate([ids], SamplingParams(max_tokens=max_tokens, temperature=0.0), model)
    return ids, c


@pytest.mark.parametrize("model", ["llama-demo", "qwen-demo"])
def test_chat_equals_offline_generate_on_the_template(serve, engine, model):
    ids, offline = offline_chat(engine, model, MESSAGES, 10)

    async def body(client):
        r = await client.post(
            "/v1/chat/completions",
            json={"model": model, "messages": MESSAGES, "max_tokens": 10, "temperature": 0},
        )
        return r.status, await r.json()

    status, out = serve(body)
    assert status == 200 and out["object"] == "chat.completion"
    assert out["id"].startswith("chatcmpl-")
    [choice] = out["choices"]
    assert choice["message"] == {"role": "assistant", "content": offline.text, "refusal": None}
    assert choice["finish_reason"] == offline.finish_reason
    assert out["usage"]["prompt_tokens"] == len(ids)
    assert out["usage"]["completion_tokens"] == len(offline.token_ids)


def test_chat_stream_shape(serve, engine):
    _, offline = offline_chat(engine, "mistral-demo", MESSAGES, 8)

    async def body(client):
        r = await client.post(
            "/v1/chat/completions",
            json={
                "model": "mistral-demo",
                "messages": MESSAGES,
                "max_completion_tokens": 8,
                "temperature": 0,
                "stream": True,
                "n": 2,
                "stream_options": {"include_usage": True},
            },
        )
        return await sse_events(r)

    events = serve(body)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 2 * len(
        offline.token_ids
    )
    chunks = events[:-2]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    for i in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"]["content"] or "" for c in mine) == offline.text
        assert mine[-1]["finish_reason"] == offline.finish_reason
        assert all(c["finish_reason"] is None for c in mine[:-1])


def test_chat_logprobs(serve):
    async def body(client):
        r = await client.post(
            "/v1/chat/completions",
            json={
                "model": "qwen-demo",
                "messages": MESSAGES,
                "max_tokens": 4,
                "temperature": 0,
                "logprobs": True,
                "top_logprobs": 3,
                "ignore_eos": True,
            },
        )
        return await r.json()

    content = serve(body)["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 3
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])


def test_default_max_tokens_is_the_rest_of_the_context(serve, engine):
    """No limit asked: the request may run to the context; a prompt that fills it is a 400."""
    max_len = engine.models["llama-demo"].max_model_len

    async def body(client):
        full = [{"role": "user", "content": "word " * max_len}]
        r = await client.post(
            "/v1/chat/completions", json={"model": "llama-demo", "messages": full}
        )
        return r.status, await r.json()

    status, err = serve(body)
    assert status == 400 and err["error"]["param"] == "prompt"
    assert "context" in err["error"]["message"]


def test_template_refusal_is_a_400(serve):
    async def body(client):
        r = await client.post(
            "/v1/chat/completions",
            json={"model": "qwen-demo", "messages": [{"role": "tool", "content": "x"}]},
        )
        return r.status, await r.json()

    status, err = serve(body)
    assert status == 400 and err["error"]["param"] == "messages"
    assert "unknown role tool" in err["error"]["message"]
