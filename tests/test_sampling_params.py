"""SamplingParams.checked: every invalid field is rejected with `param` naming it; the record
itself checks nothing."""

from __future__ import annotations

import dataclasses

import pytest

from muxserve.errors import InvalidSamplingParamsError, RequestError
from muxserve.sampling_params import MAX_LOGPROBS, SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": "16"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": -0.01}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.0001}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"stop": ("",)}, "stop"),
        ({"stop": ("ok", "")}, "stop"),
        ({"stop": (3,)}, "stop"),
        ({"stop_token_ids": (-1,)}, "stop_token_ids"),
        ({"stop_token_ids": (2, "3")}, "stop_token_ids"),
        ({"stop_token_ids": (True,)}, "stop_token_ids"),
        ({"seed": True}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 17}, "min_tokens"),  # over max_tokens (16)
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"logit_bias": ((5, 101.0),)}, "logit_bias"),
        ({"logit_bias": ((-1, 1.0),)}, "logit_bias"),
        ({"logit_bias": (("5", 1.0),)}, "logit_bias"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt_logprobs": True}, "prompt_logprobs"),
        ({"structured": "json"}, "structured"),
    ],
)
def test_invalid_field_names_itself(kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidSamplingParamsError) as info:
        SamplingParams.checked(**kwargs)
    assert info.value.param == param
    assert str(info.value).startswith(param)
    assert isinstance(info.value, RequestError)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"max_tokens": 0},
        {"max_tokens": 0, "prompt_logprobs": 0},
        {"max_tokens": 1},
        {"min_tokens": 16},
        {"min_p": 1.0},
        {"presence_penalty": -2.0, "frequency_penalty": 2},
        {"repetition_penalty": 0.5},
        {"logit_bias": ((0, -100.0), (7, 100))},
        {"temperature": 0},
        {"temperature": 0.0},
        {"temperature": 100.0},
        {"top_p": 1},
        {"top_p": 1e-9},
        {"top_k": 1},
        {"top_k": None},
        {"logprobs": 0},
        {"logprobs": MAX_LOGPROBS},
        {"seed": 0},
        {"seed": -3},
        {"seed": 2**63},
        {"stop": ("\n", "###")},
        {"stop_token_ids": (0, 2)},
    ],
)
def test_valid_edge_cases(kwargs: dict[str, object]) -> None:
    assert SamplingParams.checked(**kwargs) == SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_defaults() -> None:
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.logprobs) == (
        16,
        1.0,
        1.0,
        None,
        None,
        None,
    )
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.skip_special_tokens) == ((), (), False, True)
    assert MAX_LOGPROBS == 20


def test_greedy_is_temperature_zero() -> None:
    assert SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=1e-6).greedy


def test_frozen() -> None:
    p = SamplingParams(max_tokens=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.max_tokens = 4  # type: ignore[misc]


@pytest.mark.parametrize("value", ["3", 1.5, True])
def test_logprobs_must_be_an_integer(value: object) -> None:
    with pytest.raises(InvalidSamplingParamsError) as info:
        SamplingParams.checked(logprobs=value)
    assert info.value.param == "logprobs"


def test_the_record_itself_checks_nothing() -> None:
    """Inside the engine params are a plain record: the edges (HTTP, the CLI) check them."""
    assert SamplingParams(max_tokens=-1, top_p=0.0).max_tokens == -1
