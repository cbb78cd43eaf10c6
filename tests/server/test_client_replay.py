"""The request bodies guidellm and lm-evaluation-harness send, replayed over plain HTTP, and the
fields each reads from the answers (as their code parses them).

guidellm (backends/openai/request_handlers.py): streamed completions and chat with
`stream_options: {include_usage, continuous_usage_stats}`, `ignore_eos`, `stop: null`, a
token budget (`max_tokens` on completions, `max_completion_tokens` on chat), chat content as
text parts; it reads `choices[0].text` / `choices[0].delta.content` and the last `usage`.
lm-evaluation-harness (models/openai_completions.py): loglikelihood as `echo`, `logprobs: 1`,
`max_tokens: 1`, `temperature: 0`, `seed: 1234` over batched token ids or strings, reading
`token_logprobs[ctxlen:-1]` and `top_logprobs`; generation with `stop` and `seed`; the chat
variant with `stop[:4]`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from operator import itemgetter
from typing import Any

import aiohttp
import pytest

from muxserve.client.in_process import InProcessClient
from muxserve.server import create_app
from muxserve.server.background import BackgroundServer
from tests.helpers.server import wait_idle

MODEL = "qwen-demo"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def url(engine) -> Iterator[str]:
    with BackgroundServer(create_app(InProcessClient(engine, manage=False))) as u:
        yield u
    wait_idle(engine)


def post(url: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """POST a JSON body; a streamed answer comes back as the list of its `data:` payloads."""

    async def main() -> tuple[int, Any]:
        async with aiohttp.ClientSession() as s, s.post(url + path, json=body) as r:
            if not body.get("stream") or r.status != 200:
                return r.status, await r.json()
            events = []
            async for raw in r.content:
                line = raw.decode().strip()
                if line.startswith("data:"):
                    data = line[len("data:") :].strip()
                    events.append(data if data == "[DONE]" else json.loads(data))
            return r.status, events

    return asyncio.run(main())


# ---- guidellm --------------------------------------------------------------------------------
def guidellm_stream(events: list[Any], key: str) -> tuple[str, dict[str, int]]:
    """What guidellm's streaming handler keeps: the text pieces and the last usage."""
    assert events[-1] == "[DONE]"
    text, usage = [], {}
    for data in events[:-1]:
        assert "error" not in data
        choices = data.get("choices", [])
        choice = choices[0] if choices else {}
        piece = choice.get("text") if key == "text" else (choice.get("delta") or {}).get("content")
        if piece:
            text.append(piece)
        if data.get("usage"):
            usage = data["usage"]
    return "".join(text), usage


STREAM_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}


def test_guidellm_streamed_completions(url):
    status, events = post(
        url,
        "/v1/completions",
        {
            "model": MODEL,
            "stream": True,
            "stream_options": STREAM_OPTIONS,
            "max_tokens": 12,
            "stop": None,
            "ignore_eos": True,
            "prompt": PROMPT,
        },
    )
    assert status == 200
    text, usage = guidellm_stream(events, "text")
    assert text and usage["completion_tokens"] == 12
    assert usage["prompt_tokens"] > 0 and usage["total_tokens"] == usage["prompt_tokens"] + 12
    assert all(e["usage"] is not None for e in events[:-1])  # continuous usage


def test_guidellm_streamed_chat(url):
    status, events = post(
        url,
        "/v1/chat/completions",
        {
            "model": MODEL,
            "stream": True,
            "stream_options": STREAM_OPTIONS,
            "max_completion_tokens": 12,
            "stop": None,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}],
        },
    )
    assert status == 200
    text, usage = guidellm_stream(events, "delta")
    assert text and usage["completion_tokens"] == 12


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_guidellm_unstreamed(url, path):
    body: dict[str, Any] = {"model": MODEL, "stop": None, "ignore_eos": True}
    if path == "/v1/completions":
        body |= {"prompt": PROMPT, "max_tokens": 8}
    else:
        body |= {"messages": [{"role": "user", "content": PROMPT}], "max_completion_tokens": 8}
    status, out = post(url, path, body)
    assert status == 200
    choice = out["choices"][0]
    text = choice["text"] if path == "/v1/completions" else choice["message"]["content"]
    assert text and out["usage"]["completion_tokens"] == 8 and out["id"]


# ---- lm-evaluation-harness --------------------------------------------------------------------
def lm_eval_loglikelihood(out: dict[str, Any], ctxlens: list[int]) -> list[tuple[float, bool]]:
    """lm-eval's parse_logprobs for local-completions."""
    res = []
    for choice, ctxlen in zip(
        sorted(out["choices"], key=itemgetter("index")), ctxlens, strict=True
    ):
        lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        greedy = all(t == max(top.values()) for t, top in zip(lps, tops, strict=True))
        res.append((sum(lps), greedy))
    return res


def test_lm_eval_loglikelihood_over_token_ids(url, engine):
    tok = engine.models[MODEL].tokenizer
    contexts = ["The capital of France is", "Two plus two equals"]
    continuations = [" Paris", " four"]
    prompts = [tok.encode(c + x) for c, x in zip(contexts, continuations, strict=True)]
    ctxlens = [len(tok.encode(c)) for c in contexts]
    status, out = post(
        url,
        "/v1/completions",
        {
            "model": MODEL,
            "prompt": prompts,
            "temperature": 0,
            "max_tokens": 1,
            "logprobs": 1,
            "seed": 1234,
            "echo": True,
        },
    )
    assert status == 200
    scored = lm_eval_loglikelihood(out, ctxlens)
    assert len(scored) == 2
    for (logprob, greedy), choice, p in zip(scored, out["choices"], prompts, strict=True):
        assert logprob < 0 and isinstance(greedy, bool)
        assert len(choice["logprobs"]["token_logprobs"]) == len(p) + 1
    # the same request one prompt at a time gives the same scores (batch-invariant)
    for i, p in enumerate(prompts):
        status, one = post(
            url,
            "/v1/completions",
            {
                "model": MODEL,
                "prompt": p,
                "temperature": 0,
                "max_tokens": 1,
                "logprobs": 1,
                "seed": 1234,
                "echo": True,
            },
        )
        assert lm_eval_loglikelihood(one, [ctxlens[i]])[0][0] == pytest.approx(
            scored[i][0], abs=1e-5
        )


def test_lm_eval_loglikelihood_over_strings(url):
    status, out = post(
        url,
        "/v1/completions",
        {
            "model": MODEL,
            "prompt": ["The capital of France is Paris"],
            "temperature": 0,
            "max_tokens": 1,
            "logprobs": 1,
            "seed": 1234,
            "echo": True,
        },
    )
    assert status == 200
    [(logprob, _)] = lm_eval_loglikelihood(out, [3])
    assert logprob < 0
    assert out["choices"][0]["text"].startswith("The capital of France is Paris")


def test_lm_eval_generate_until(url):
    status, out = post(
        url,
        "/v1/completions",
        {
            "prompt": ["Q: What is 2+2?\nA:", "Q: Name a colour.\nA:"],
            "model": MODEL,
            "max_tokens": 32,
            "temperature": 0,
            "stop": ["\n\n", "Q:", "<|eos|>"],
            "seed": 1234,
        },
    )
    assert status == 200
    texts = [None] * len(out["choices"])
    for c in out["choices"]:  # lm-eval's parse_generations
        texts[c["index"]] = c["text"]
    assert all(isinstance(t, str) for t in texts)
    assert all("Q:" not in t and "\n\n" not in t for t in texts)


def test_lm_eval_local_chat_completions(url):
    status, out = post(
        url,
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Name a colour."}],
            "model": MODEL,
            "max_tokens": 16,
            "temperature": 0,
            "stop": ["\n\n", "Q:", "<|eos|>", "###"][:4],
            "seed": 1234,
        },
    )
    assert status == 200
    texts = [None] * len(out["choices"])
    for c in out["choices"]:
        texts[c["index"]] = c["message"]["content"]
    assert isinstance(texts[0], str)
