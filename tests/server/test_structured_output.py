"""Structured output through the official `openai` client (llguidance): JSON schema output
validates for 20 seeded samples at temperature 1; JSON mode; vLLM's guided_regex and
guided_choice; forced tool calls (required, named, streamed) in the OpenAI shape; the chat
template gets the tools; tool_choice auto and bad schemas are 400s that say why."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from muxserve.client.in_process import InProcessClient
from muxserve.server import create_app
from muxserve.server.background import BackgroundServer
from tests.helpers.server import wait_idle

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "fish"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "pet", "tags", "ok"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
ZONE = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 6}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": ZONE}},
]
ASK = [{"role": "user", "content": "What is the weather?"}]


@pytest.fixture(scope="module")
def client(engine) -> Iterator[Any]:
    app = create_app(InProcessClient(engine, manage=False))
    with BackgroundServer(app) as url:
        yield openai.OpenAI(api_key="x", base_url=f"{url}/v1", max_retries=0, timeout=120)
    wait_idle(engine)


def test_json_schema_output_validates_for_20_seeded_samples_at_temperature_1(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}

    def ten(seed: int) -> list[Any]:
        out = client.chat.completions.create(
            model="qwen-demo",
            messages=[{"role": "user", "content": "A person, as JSON"}],
            response_format=fmt,
            temperature=1.0,
            seed=seed,
            n=10,  # seeds seed .. seed + 9
            max_tokens=120,
        )
        return out.choices

    with ThreadPoolExecutor(2) as pool:
        choices = [c for batch in pool.map(ten, (0, 10)) for c in batch]
    assert len(choices) == 20
    texts = set()
    for c in choices:
        assert c.finish_reason == "stop", c.message.content
        value = json.loads(c.message.content)
        jsonschema.validate(value, PERSON)
        texts.add(c.message.content)
    assert len(texts) > 10  # sampled, not one text twenty times


def test_json_mode_gives_an_object_or_a_cut_off_one(client):
    """A random-weight model writes endless keys at times: what finishes is an object."""
    out = client.completions.create(
        model="llama-demo",
        prompt="Give me JSON",
        temperature=1.0,
        seed=0,
        n=5,
        max_tokens=100,
        extra_body={"response_format": {"type": "json_object"}},  # vLLM: on completions too
    )
    finished = 0
    for c in out.choices:
        assert c.text.startswith("{")
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)
            finished += 1
        else:
            assert c.finish_reason == "length"
    assert finished >= 1


def test_guided_regex_and_choice_on_completions(client):
    regex = r"[0-9]{3}-[a-z]{2}"
    out = client.completions.create(
        model="mistral-demo",
        prompt="Code:",
        temperature=1.0,
        seed=1,
        n=4,
        max_tokens=20,
        extra_body={"guided_regex": regex},
    )
    assert all(re.fullmatch(regex, c.text) and c.finish_reason == "stop" for c in out.choices)
    choices = ["yes", "no", "maybe not"]
    out = client.completions.create(
        model="mistral-demo",
        prompt="Answer:",
        temperature=1.0,
        seed=1,
        n=6,
        max_tokens=20,
        extra_body={"structured_outputs": {"choice": choices}},
    )
    assert {c.text for c in out.choices} <= set(choices)


def test_tool_choice_required_returns_calls_in_the_openai_shape(client):
    schemas = {"get_weather": WEATHER, "get_time": ZONE}
    seen = set()
    for model in ("llama-demo", "mistral-demo"):
        for seed in (0, 1):
            out = client.chat.completions.create(
                model=model,
                messages=ASK,
                tools=TOOLS,
                tool_choice="required",
                temperature=1.0,
                seed=seed,
                max_tokens=200,
            )
            [c] = out.choices
            assert c.finish_reason == "tool_calls"
            assert c.message.content is None and c.message.tool_calls
            for call in c.message.tool_calls:
                assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
                jsonschema.validate(
                    json.loads(call.function.arguments), schemas[call.function.name]
                )
                seen.add(call.function.name)
    assert seen == {"get_weather", "get_time"}


def test_a_named_tool_choice_calls_that_function(client):
    out = client.chat.completions.create(
        model="qwen-demo",
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=1.0,
        seed=1,
        max_tokens=100,
    )
    [c] = out.choices
    [call] = c.message.tool_calls
    assert (c.finish_reason, call.function.name) == ("stop", "get_weather")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_a_named_tool_call_streams_its_arguments(client):
    stream = client.chat.completions.create(
        model="qwen-demo",
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=1.0,
        seed=2,
        max_tokens=100,
        stream=True,
    )
    deltas = [c.choices[0] for c in stream if c.choices]
    first = deltas[0].delta.tool_calls[0]
    assert (first.index, first.function.name, first.function.arguments) == (0, "get_weather", "")
    assert first.id.startswith("chatcmpl-tool-")
    args = "".join(
        d.delta.tool_calls[0].function.arguments for d in deltas[1:] if d.delta.tool_calls
    )
    jsonschema.validate(json.loads(args), WEATHER)
    assert deltas[-1].finish_reason == "stop"


def test_the_chat_template_gets_the_tools(client):
    """A template that lists the tools' names: the prompt grows by exactly that text."""
    template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if tools %}"
        "[{{ tools | map(attribute='function') | map(attribute='name') | join(',') }}]"
        "{% endif %}"
    )
    base = {"model": "llama-demo", "messages": ASK, "max_tokens": 1}
    plain = client.chat.completions.create(**base, extra_body={"chat_template": template})
    with_tools = client.chat.completions.create(
        **base,
        tools=TOOLS,
        tool_choice="required",
        extra_body={"chat_template": template},
    )
    tokenized = client.post(
        "/../tokenize",
        cast_to=object,
        body={
            "model": "llama-demo",
            "prompt": ASK[0]["content"] + "[get_weather,get_time]",
            "add_special_tokens": False,
        },
    )
    assert with_tools.usage.prompt_tokens == tokenized["count"]
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens


@pytest.mark.parametrize(
    "kwargs,param,words",
    [
        ({"tools": TOOLS}, "tool_choice", "tool-call parser"),  # auto, the default with tools
        ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice", "tool-call parser"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "not in tools",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {"type": "object", "minProperties": "2"},
                    },
                }
            },
            "response_format",
            "invalid json schema",
        ),
        (
            {
                "tools": TOOLS,
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "tool_choice",
            "not both",
        ),
    ],
)
def test_what_cannot_be_served_is_a_400_that_says_why(client, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="llama-demo", messages=ASK, max_tokens=4, **kwargs)
    assert e.value.body["param"] == param
    assert words in e.value.body["message"]
