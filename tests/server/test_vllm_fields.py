"""Every field vLLM's OpenAI server accepts is accepted; unknown fields are a 400 naming them, or
logged and dropped with `ignore_unknown_fields`; continuous_usage_stats; vLLM's tokenizer
routes; /version and `muxserve --version`."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from muxserve import __version__
from muxserve.client.in_process import InProcessClient
from muxserve.server import ServerSettings, create_app
from muxserve.server.background import BackgroundServer
from tests.helpers.server import sse_events, wait_idle

openai = pytest.importorskip("openai")

MODEL = "llama-demo"

# vLLM's extensions with a value that is valid and not the default (the field is really read)
SAMPLING_EXTRAS: dict[str, Any] = {
    "use_beam_search": False,
    "top_k": 20,
    "min_p": 0.01,
    "repetition_penalty": 1.1,
    "length_penalty": 0.5,
    "stop_token_ids": [3],
    "include_stop_str_in_output": True,
    "ignore_eos": True,
    "min_tokens": 1,
    "skip_special_tokens": False,
    "spaces_between_special_tokens": False,
    "truncate_prompt_tokens": 50,
    "allowed_token_ids": list(range(7, 900)),
    "bad_words": ["zebra"],
    "prompt_logprobs": 1,
    "guided_whitespace_pattern": None,
    "guided_decoding_backend": "xgrammar",
    "priority": 0,
    "request_id": "req-fields-1",
    "logits_processors": None,
    "return_tokens_as_token_ids": True,
    "cache_salt": "salt",
    "kv_transfer_params": {"k": "v"},
    "vllm_xargs": {"a": 1},
    "mm_processor_kwargs": {},
}


@pytest.fixture(scope="module")
def url(engine) -> Iterator[str]:
    app = create_app(InProcessClient(engine, manage=False))
    with BackgroundServer(app) as u:
        yield u
    wait_idle(engine)


@pytest.fixture(scope="module")
def client(url: str) -> Any:
    return openai.OpenAI(api_key="x", base_url=f"{url}/v1", max_retries=0, timeout=60)


def test_every_vllm_completions_field_is_accepted(client):
    out = client.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=4,
        temperature=0.7,
        top_p=0.9,
        n=1,
        seed=3,
        presence_penalty=0.1,
        frequency_penalty=0.1,
        logit_bias={"20": 1.0},
        logprobs=1,
        echo=False,
        best_of=2,
        user="u",
        stop=["\n\n"],
        extra_body={
            **SAMPLING_EXTRAS,
            "add_special_tokens": False,
            "response_format": {"type": "text"},
        },
    )
    [choice] = out.choices
    assert out.id == "cmpl-req-fields-1"  # vLLM: the client's request_id
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 4
    assert all(t.startswith("token_id:") for t in choice.logprobs.tokens)
    assert len(choice.model_extra["prompt_logprobs"]) == out.usage.prompt_tokens


def test_every_vllm_chat_field_is_accepted(client):
    out = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello"}],
        max_completion_tokens=4,
        temperature=0.7,
        top_p=0.9,
        n=1,
        seed=3,
        presence_penalty=0.1,
        frequency_penalty=0.1,
        logit_bias={"20": 1.0},
        logprobs=True,
        top_logprobs=1,
        user="u",
        stop="\n\n",
        store=False,
        metadata={"a": "b"},
        parallel_tool_calls=True,
        service_tier="auto",
        extra_body={
            **SAMPLING_EXTRAS,
            "best_of": 2,
            "echo": False,
            "add_generation_prompt": True,
            "continue_final_message": False,
            "add_special_tokens": False,
            "documents": [{"title": "t", "text": "x"}],
            "chat_template_kwargs": {"enable_thinking": False},
            "include_reasoning": False,
            "reasoning_effort": "low",
        },
    )
    [choice] = out.choices
    assert out.id == "chatcmpl-req-fields-1"
    assert choice.finish_reason == "length" and out.usage.completion_tokens == 4
    assert len(choice.logprobs.content) == 4
    assert len(out.model_extra["prompt_logprobs"]) == out.usage.prompt_tokens


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("use_beam_search", True, "use_beam_search is not supported"),
        ("priority", 3, "priority"),
        ("logits_processors", ["my.Processor"], "logits_processors"),
        ("prompt_embeds", "AAAA", "prompt_embeds"),
        ("suffix", "end", "suffix"),
        ("response_format", {"type": "structural_tag", "structures": []}, "structural_tag"),
        ("max_tokens", 0, "echo"),
        ("prompt_logprobs", 2, "streaming"),
    ],
)
def test_the_few_refused_fields_say_why(client, field, value, words):
    stream = field == "prompt_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(
            model=MODEL, prompt="x", max_tokens=1, stream=stream, extra_body={field: value}
        )
    body = e.value.body
    assert body["param"].split(".")[0] == field
    assert words in body["message"]


def test_unknown_fields_are_a_400_or_logged_and_dropped(engine, caplog):
    body = {
        "model": MODEL,
        "prompt": "x",
        "max_tokens": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
        # extra_body is how a client sends fields the API does not define: a typo, and one inside
        "extra_body": {"max_token": 5, "stream_options": {"include_usage": True, "colour": 1}},
    }
    strict = create_app(InProcessClient(engine, manage=False))
    with BackgroundServer(strict) as u:
        c = openai.OpenAI(api_key="x", base_url=f"{u}/v1", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(**body)
    assert e.value.body["param"] == "max_token"
    assert "max_token: unknown field" in e.value.body["message"]
    assert "stream_options.colour: unknown field" in e.value.body["message"]
    lenient = create_app(
        InProcessClient(engine, manage=False), ServerSettings(ignore_unknown_fields=True)
    )
    with caplog.at_level(logging.WARNING), BackgroundServer(lenient) as u:
        c = openai.OpenAI(api_key="x", base_url=f"{u}/v1", max_retries=0)
        chunks = list(c.completions.create(**body))
    assert chunks[-1].usage.completion_tokens == 2  # max_tokens 2, not the typo's 5
    [line] = [r.getMessage() for r in caplog.records if "ignored unknown fields" in r.getMessage()]
    assert sorted(line.split(": ", 1)[1].split(", ")) == ["max_token", "stream_options.colour"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_stats_puts_usage_in_every_chunk(client, path):
    base: dict[str, Any] = {"model": MODEL, "max_tokens": 5, "stream": True, "n": 2}
    opts = {"include_usage": True, "continuous_usage_stats": True}
    if path == "/v1/completions":
        chunks = list(
            client.completions.create(
                prompt="Hello", stream_options=opts, extra_body={"ignore_eos": True}, **base
            )
        )
        prompt_tokens = chunks[-1].usage.prompt_tokens
    else:
        chunks = list(
            client.chat.completions.create(
                messages=[{"role": "user", "content": "Hi"}],
                stream_options=opts,
                extra_body={"ignore_eos": True},
                **base,
            )
        )
        prompt_tokens = chunks[-1].usage.prompt_tokens
    *per_choice, last = chunks
    assert all(c.usage is not None for c in chunks)
    seen: dict[int, list[int]] = {0: [], 1: []}
    for c in per_choice:
        [choice] = c.choices
        seen[choice.index].append(c.usage.completion_tokens)
        assert c.usage.prompt_tokens == prompt_tokens
        assert c.usage.total_tokens == prompt_tokens + c.usage.completion_tokens
    for counts in seen.values():  # each choice's own count, rising to 5
        assert counts == sorted(counts) and counts[-1] == 5
    assert last.choices == [] and last.usage.completion_tokens == 10


def test_continuous_usage_over_raw_sse_for_guidellm(url):
    """guidellm reads `usage` from every chunk and the text from `choices[0].text`."""
    import asyncio

    import aiohttp

    async def main() -> list[Any]:
        async with aiohttp.ClientSession() as s:
            r = await s.post(
                f"{url}/v1/completions",
                json={
                    "model": MODEL,
                    "prompt": "Hi",
                    "max_tokens": 3,
                    "stream": True,
                    "stream_options": {"continuous_usage_stats": True},  # include_usage implied
                    "ignore_eos": True,
                },
            )
            assert r.status == 200
            return await sse_events(r)

    events = asyncio.run(main())
    assert events[-1] == "[DONE]"
    assert [e["usage"]["completion_tokens"] for e in events[:-1]][-1] == 3


# ---- tokenizer routes and version -------------------------------------------------------------
def test_tokenize_and_detokenize_round_trip(client, url, engine):
    import json
    import urllib.request

    def post(path: str, body: dict[str, Any]) -> tuple[int, Any]:
        req = urllib.request.Request(
            url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    tok = engine.models[MODEL].tokenizer
    status, out = post("/tokenize", {"model": MODEL, "prompt": "Hello world"})
    assert status == 200
    assert out == {
        "count": len(out["tokens"]),
        "max_model_len": 1024,
        "tokens": tok.encode("Hello world"),
    }
    status, bare = post(
        "/tokenize",
        {
            "model": MODEL,
            "prompt": "Hello world",
            "add_special_tokens": False,
            "return_token_strs": True,
        },
    )
    assert bare["tokens"] == tok.encode("Hello world", add_special_tokens=False)
    assert len(bare["token_strs"]) == bare["count"] == len(out["tokens"]) - 1  # no BOS
    status, back = post("/detokenize", {"model": MODEL, "tokens": bare["tokens"]})
    assert (status, back) == (200, {"prompt": "Hello world"})
    # chat messages, rendered as the completions route renders them
    messages = [{"role": "user", "content": "Hi"}]
    status, chat = post("/tokenize", {"model": MODEL, "messages": messages})
    done = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert chat["count"] == done.usage.prompt_tokens
    # several models are served: model is required (lm-eval's remote tokenizer sends none)
    status, err = post("/tokenize", {"prompt": "x"})
    assert status == 400 and err["error"]["param"] == "model"
    status, err = post("/detokenize", {"model": MODEL, "tokens": [10**6]})
    assert status == 400 and err["error"]["param"] == "tokens"
    status, err = post("/tokenize", {"model": "nope", "prompt": "x"})
    assert status == 404


def test_version_route_and_cli(url):
    import json
    import urllib.request

    with urllib.request.urlopen(f"{url}/version") as r:
        assert json.loads(r.read()) == {"version": __version__}
    with urllib.request.urlopen(f"{url}/tokenizer_info?model={MODEL}") as r:
        info = json.loads(r.read())
    assert info["eos_token"] == "<|eos|>" and "chat_template" in info
    run = subprocess.run(
        [sys.executable, "-m", "muxserve.cli", "--version"], capture_output=True, text=True
    )
    assert (run.returncode, run.stdout) == (0, f"muxserve {__version__}\n")


def test_the_model_may_be_left_out_where_one_model_is_served(idle_engine):
    """lm-evaluation-harness's remote tokenizer: no model in /tokenize, GET /tokenizer_info."""
    import json
    import urllib.request

    app = create_app(InProcessClient(idle_engine, manage=False))
    with BackgroundServer(app) as u:
        req = urllib.request.Request(
            f"{u}/tokenize",
            json.dumps({"prompt": "test", "add_special_tokens": False}).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req) as r:
            tokens = json.loads(r.read())["tokens"]
        with urllib.request.urlopen(f"{u}/tokenizer_info") as r:
            info = json.loads(r.read())
    tok = idle_engine.models["mistral-demo"].tokenizer
    assert tokens == tok.encode("test", add_special_tokens=False)
    assert info["eos_token"] == "<|eos|>"
