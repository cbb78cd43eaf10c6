"""The OpenAI API's request bodies, as pydantic models that reject what MuxServe cannot honour.

Bodies are parsed strictly (no "5" for 5, no NaN, no unknown top-level fields), so a typo such as
`max_token` is a 400 that names the field instead of a silently ignored setting. Fields of the
OpenAI API that MuxServe does not implement are accepted only at their neutral values.
Responses are in `muxserve.server.responses`.
"""

from __future__ import annotations

from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator

from muxserve.errors import InvalidSamplingParamsError
from muxserve.sampling_params import MAX_LOGPROBS, SamplingParams

MAX_N = 16  # choices per prompt
MAX_STOP = 16  # stop strings per request
GREEDY_BELOW = 1e-5  # temperatures under this are greedy (dividing logits by ~0 overflows)

# What a completions `prompt` may be: one prompt (text or token ids) or a batch of them.
Prompt = str | list[str] | list[int] | list[list[int]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


class StreamOptions(_Strict):
    """`stream_options`: whether the last chunk carries the usage."""

    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted, ignored (there is nothing to pad)


def _is_ids(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


class _SamplingRequest(_Strict):
    """The fields chat and completions share: the model and how to sample."""

    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # extension (as vLLM): -1 or 0 turn it off
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted, ignored
    # extensions (as vLLM)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP)
    skip_special_tokens: bool = True

    @field_validator("stop", mode="plain")
    @classmethod
    def _stop(cls, v: object) -> str | list[str] | None:
        if v is None or (isinstance(v, str) and v):
            return v
        if isinstance(v, list) and len(v) <= MAX_STOP and all(isinstance(s, str) and s for s in v):
            return v
        raise ValueError(f"stop must be a non-empty string or a list of at most {MAX_STOP}")

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v:
            raise ValueError("penalties are not supported; leave it out or send 0")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("logit_bias is not supported; leave it out or send {}")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _token_ids(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(t < 0 for t in v):
            raise ValueError("stop_token_ids must be non-negative")
        return v

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int, logprobs: int | None, choice: int) -> SamplingParams:
        """The engine's params for choice `choice` of a prompt.

        Choices of a seeded request get seeds seed, seed+1, ...: reproducible, yet not n
        copies of one text.
        """
        temperature = 1.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        if temperature < GREEDY_BELOW or top_p == 0.0:
            temperature, top_p = 0.0, 1.0
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=self.top_k if self.top_k is not None and self.top_k > 0 else None,
            seed=None if self.seed is None else self.seed + choice,
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: Prompt
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt(cls, v: object) -> Prompt:
        if isinstance(v, str) or _is_ids(v):
            return cast(Prompt, v)
        if (
            isinstance(v, list)
            and v
            and (all(isinstance(p, str) for p in v) or all(map(_is_ids, v)))
        ):
            return v
        raise ValueError(
            "prompt must be a string, a list of token ids, or a non-empty list of either"
        )

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported")
        return v

    def prompts(self) -> list[str] | list[list[int]]:
        """The batch: one entry per prompt, text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if _is_ids(p):
            return [cast(list[int], p)]
        return cast(list[str] | list[list[int]], p)

    def params(self, choice: int) -> SamplingParams:
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidSamplingParamsError("best_of other than n is not supported", "best_of")
        return self.sampling_params(self.max_tokens or 16, self.logprobs, choice)


class TextPart(_Strict):
    """A text part of a message's content."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message. Other keys (`refusal`, `tool_calls`: null, ...) are allowed and ignored, so
    a client can send back the messages it received."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, v: object) -> object:
        if isinstance(v, list):
            for part in v:
                if isinstance(part, dict) and part.get("type") not in (None, "text"):
                    raise ValueError(
                        f"content parts of type {part.get('type')!r} are not supported; only text"
                    )
        return v

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(p.text for p in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates expect it (`developer` is the newer `system`)."""
        msg: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text(),
        }
        if self.name is not None:
            msg["name"] = self.name
        return msg


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI; still honoured
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # accepted, ignored
    response_format: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None  # accepted, ignored
    store: bool | None = None  # accepted, ignored
    service_tier: str | None = None  # accepted, ignored
    add_generation_prompt: bool = True  # extension

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if v:
            raise ValueError("tools are not supported")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if v not in (None, "none", "auto"):
            raise ValueError("tool_choice is not supported (there are no tools)")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v != {"type": "text"}:
            raise ValueError('only {"type": "text"} is supported')
        return v

    def requested_max_tokens(self) -> int | None:
        """max_completion_tokens, else max_tokens; None: up to the model's context."""
        return self.max_completion_tokens or self.max_tokens

    def params(self, max_tokens: int, choice: int) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidSamplingParamsError(
                "top_logprobs needs logprobs set to true", "top_logprobs"
            )
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(max_tokens, logprobs, choice)
