"""The official `openai` client, unchanged, against a live server on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from muxserve.client.in_process import InProcessClient
from muxserve.sampling_params import SamplingParams
from muxserve.server import ServerSettings, create_app
from muxserve.server.background import BackgroundServer
from tests.helpers.server import wait_idle

openai = pytest.importorskip("openai")

KEY = "sk-test"


@pytest.fixture(scope="module")
def client(engine) -> Iterator[openai.OpenAI]:
    app = create_app(InProcessClient(engine, manage=False), ServerSettings(api_key=KEY))
    with BackgroundServer(app) as url:
        yield openai.OpenAI(api_key=KEY, base_url=f"{url}/v1", max_retries=0, timeout=30)
    wait_idle(engine)


def test_models(client):
    assert [m.id for m in client.models.list()] == ["llama-demo", "qwen-demo", "mistral-demo"]
    assert client.models.retrieve("qwen-demo").id == "qwen-demo"


def test_completion_matches_the_engine(client, engine):
    [offline] = engine.generate(
        ["Hello"], SamplingParams(max_tokens=8, temperature=0.0), "llama-demo"
    )
    out = client.completions.create(model="llama-demo", prompt="Hello", max_tokens=8, temperature=0)
    assert out.choices[0].text == offline.text
    assert out.usage.completion_tokens == len(offline.token_ids)
    logged = client.completions.create(
        model="llama-demo", prompt="Hello", max_tokens=3, temperature=0, logprobs=2
    )
    assert len(logged.choices[0].logprobs.tokens) == 3


def test_chat_and_streams(client):
    messages = [{"role": "user", "content": "Say something."}]
    whole = client.chat.completions.create(
        model="qwen-demo",
        messages=messages,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    assert whole.choices[0].message.role == "assistant"
    assert len(whole.choices[0].logprobs.content[0].top_logprobs) == 2
    stream = client.chat.completions.create(
        model="qwen-demo",
        messages=messages,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    comp = list(
        client.completions.create(model="mistral-demo", prompt="Hi", max_tokens=4, stream=True)
    )
    assert comp[-1].choices[0].finish_reason in ("stop", "length")


def test_errors_map_to_the_clients_exceptions(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="llama-demo", prompt="x", max_tokens=100_000)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="llama-demo", messages=[], max_tokens=2)
    bad_key = client.with_options(api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()


def test_rate_limit_error(idle_engine):
    """429 reaches the client as RateLimitError (the idle engine's one queue slot is taken)."""
    app = create_app(InProcessClient(idle_engine, manage=False))
    idle_engine.add_request(
        "mistral-demo", [5, 6], SamplingParams(max_tokens=1), request_id="holder"
    )
    try:
        with BackgroundServer(app) as url:
            c = openai.OpenAI(api_key="x", base_url=f"{url}/v1", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                c.completions.create(model="mistral-demo", prompt="x", max_tokens=1)
    finally:
        idle_engine.abort("holder")
    wait_idle(idle_engine)
