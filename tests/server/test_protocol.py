"""Request models: strict parsing, errors that name the field, the mapping to SamplingParams."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from muxserve.errors import InvalidSamplingParamsError
from muxserve.sampling_params import check_sampling_params
from muxserve.server.errors import from_validation_error
from muxserve.server.protocol import ChatCompletionRequest, CompletionRequest

BASE = {"model": "m", "prompt": "hi"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def bad(cls: type, body: dict) -> tuple[str, str | None]:
    with pytest.raises(ValidationError) as e:
        cls.model_validate_json(json.dumps(body))
    err = from_validation_error(e.value)
    assert err.status == 400
    return err.info.message, err.info.param


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", "5"),
        ("max_tokens", 5.0),
        ("max_tokens", -1),
        ("temperature", "hot"),
        ("temperature", 2.5),
        ("temperature", -1),
        ("top_p", 1.5),
        ("top_k", -2),
        ("n", True),
        ("n", 17),
        ("stream", "yes"),
        ("seed", 2**64),
        ("logprobs", 21),
        ("logprobs", True),
        ("stop", 5),
        ("stop", [""]),
        ("stop", ["x"] * 17),
        ("prompt", 5),
        ("prompt", {"a": 1}),
        ("prompt", [1, "a"]),
        ("prompt", [[1], "a"]),
        ("prompt", [True]),
        ("model", 5),
        ("model", ""),
        ("max_token", 5),  # a typo is an unknown field, not an ignored one
        ("presence_penalty", 2.5),
        ("frequency_penalty", "1"),
        ("logit_bias", {"a": 1.0}),
        ("logit_bias", {"\u00b2": 1.0}),  # a digit to str.isdigit(), not to int(): was a 500
        ("echo", "yes"),
        ("suffix", "x"),
        ("use_beam_search", True),
        ("priority", 1),
        ("logits_processors", ["m.P"]),
        ("prompt_embeds", "AAAA"),
        ("min_p", 1.5),
        ("repetition_penalty", 0),
        ("min_tokens", -1),
        ("prompt_logprobs", 21),
        ("truncate_prompt_tokens", 0),
        ("allowed_token_ids", [-1]),
        ("stream_options", {"continuous_usage_stats": 1}),
        ("stream_options", {"include_usage": "yes"}),
        ("stop_token_ids", [-1]),
    ],
)
def test_completion_fields_are_checked_and_named(field, value):
    message, param = bad(CompletionRequest, {**BASE, field: value})
    assert param is not None and param.split(".")[0] == field
    assert message.startswith(field)


@pytest.mark.parametrize(
    "field,value",
    [
        ("messages", []),
        ("messages", "hi"),
        ("messages", [{"role": "robot", "content": "x"}]),
        ("messages", [{"content": "x"}]),
        ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        ("messages", [{"role": "user", "content": 5}]),
        ("top_logprobs", 30),
        ("tools", [{"type": "function"}]),
        ("tool_choice", "sometimes"),
        ("tools", [{"type": "function", "function": {"name": "f", "extra": 1}}]),
        ("response_format", {"type": "yaml"}),
        ("functions", [{"name": "f"}]),
        ("max_completion_tokens", 0),
    ],
)
def test_chat_fields_are_checked_and_named(field, value):
    message, param = bad(ChatCompletionRequest, {**CHAT, field: value})
    assert param is not None and param.split(".")[0] == field
    assert field in message


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"[]", b"null", b'"x"', b"[" * 5000, b"\xff\xfe", b'{"model": "m", "prompt": NaN}'],
)
def test_malformed_json_is_a_400(body):
    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate_json(body)
    assert from_validation_error(e.value).status == 400


def test_neutral_values_of_unsupported_fields_are_accepted():
    CompletionRequest.model_validate(
        {
            **BASE,
            "presence_penalty": 0,
            "frequency_penalty": 0.0,
            "logit_bias": {},
            "echo": False,
            "best_of": 1,
            "user": "u",
            "suffix": None,
        }
    )
    ChatCompletionRequest.model_validate(
        {
            **CHAT,
            "tools": [],
            "tool_choice": "none",
            "response_format": {"type": "text"},
            "parallel_tool_calls": True,
            "store": False,
            "metadata": {"k": "v"},
        }
    )


def test_sampling_params_mapping():
    req = CompletionRequest.model_validate(
        {**BASE, "temperature": 1e-9, "top_k": -1, "stop": "END", "seed": 7, "max_tokens": 9}
    )
    p0, p1 = req.params(0, None), req.params(1, None)
    assert (p0.temperature, p0.top_k, p0.stop, p0.max_tokens) == (0.0, None, ("END",), 9)
    assert (p0.seed, p1.seed) == (7, 8)  # choices of a seeded request differ, reproducibly
    req = CompletionRequest.model_validate({**BASE, "top_p": 0.0, "top_k": 5, "logprobs": 3})
    p = req.params(0, 3)
    assert (p.temperature, p.top_p, p.top_k, p.logprobs, p.seed) == (0.0, 1.0, 5, 3, None)
    assert CompletionRequest.model_validate(BASE).params(0, None).max_tokens == 16  # OpenAI's


def test_prompt_shapes():
    def prompts(p: object) -> object:
        return CompletionRequest.model_validate({**BASE, "prompt": p}).prompts()

    assert prompts("a") == ["a"]
    assert prompts([1, 2]) == [[1, 2]]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([[1], [2, 3]]) == [[1], [2, 3]]


def test_chat_messages_for_the_template():
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                    "name": "ann",
                },
                {"role": "assistant", "content": None, "refusal": None, "tool_calls": None},
            ],
        }
    )
    assert [m.for_template() for m in req.messages] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb", "name": "ann"},
        {"role": "assistant", "content": ""},
    ]


def test_chat_max_tokens_and_logprobs():
    req = ChatCompletionRequest.model_validate(
        {**CHAT, "max_tokens": 5, "max_completion_tokens": 3, "logprobs": True, "top_logprobs": 2}
    )
    assert req.requested_max_tokens() == 3
    assert req.requested_logprobs() == 2
    plain = ChatCompletionRequest.model_validate({**CHAT, "logprobs": True})
    assert plain.requested_logprobs() == 0
    with pytest.raises(InvalidSamplingParamsError) as e:
        ChatCompletionRequest.model_validate({**CHAT, "top_logprobs": 2}).check()
    assert e.value.param == "top_logprobs"


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("allowed_token_ids", [], "allowed_token_ids must be a non-empty list of token ids"),
        ("bad_words", ["ok", ""], "bad_words must be non-empty strings"),
    ],
)
def test_what_no_field_validator_checks_is_checked_where_params_are_made(field, value, message):
    req = CompletionRequest.model_validate({**BASE, field: value})
    with pytest.raises(InvalidSamplingParamsError) as e:
        req.params(0, None)
    assert (str(e.value), e.value.param) == (message, field)


EDGES = {  # the extremes each field's validator lets through
    "temperature": [0.0, 1e-9, 2.0],
    "top_p": [0.0, 1e-9, 1.0],
    "top_k": [-1, 0, 1, 10**9],
    "min_p": [0.0, 1.0],
    "seed": [-(2**63), 2**64 - 1],
    "presence_penalty": [-2.0, 2.0],
    "frequency_penalty": [-2.0, 2.0],
    "repetition_penalty": [1e-9, 1e300],
    "logit_bias": [{"0": -1e300, "7": 1e300}],
    "stop": ["x", ["x"] * 16],
    "stop_token_ids": [[], [0]],
    "min_tokens": [0, 10**9],
    "max_tokens": [1, 10**9],
    "logprobs": [0, 20],
    "prompt_logprobs": [0, 20],
    "allowed_token_ids": [[0]],
    "bad_words": [["x"]],
}


@pytest.mark.parametrize("field,value", [(f, v) for f, values in EDGES.items() for v in values])
def test_what_the_edge_accepts_the_inside_accepts(field, value):
    """The server checks requests only at the edge: whatever passes it must make params that
    `SamplingParams.checked` would take as they are."""
    req = CompletionRequest.model_validate({**BASE, field: value})
    req.check()
    for choice in (0, 1):
        params = req.params(choice, req.logprobs)
        check_sampling_params(params)
