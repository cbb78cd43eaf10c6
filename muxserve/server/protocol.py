"""The OpenAI API's request bodies (with vLLM's extensions), as strict pydantic models.

Bodies are parsed strictly (no "5" for 5, no NaN), and a field neither OpenAI nor vLLM defines
is a 400 naming it (a typo such as `max_token` is not silently ignored; the server's
`--ignore-unknown-fields` logs and drops them instead, as vLLM does). Every field vLLM's server
accepts is accepted: those that change the output are implemented; those that cannot apply
here are accepted and ignored (`IGNORED` lists them, with why); a few are refused at any
non-neutral value with a 400 that says so (`REFUSED`). Responses are in `responses.py`.
"""

from __future__ import annotations

import json
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from muxserve.errors import InvalidSamplingParamsError
from muxserve.sampling_params import (
    MAX_BIAS,
    MAX_LOGPROBS,
    MAX_PENALTY,
    SamplingParams,
    StructuredOutput,
)
from muxserve.server.formats import ResponseFormat, StructuredOutputs, structured_output
from muxserve.server.strict import Strict
from muxserve.server.tools import NamedToolChoice, Tool, ToolChoice, forced_schema

MAX_N = 16  # choices per prompt (and best_of)
MAX_STOP = 16  # stop strings per request
GREEDY_BELOW = 1e-5  # temperatures under this are greedy (dividing logits by ~0 overflows)

# What a completions `prompt` may be: one prompt (text or token ids) or a batch of them.
Prompt = str | list[str] | list[int] | list[list[int]]

# Fields accepted and ignored, with why (the README's table is built from the same list).
IGNORED: dict[str, str] = {
    "user": "no per-user accounting",
    "metadata, store, service_tier, prompt_cache_key, safety_identifier": "nothing is stored",
    "parallel_tool_calls": "tool calls are constrained to a schema; the model decides nothing",
    "stream_options.include_obfuscation": "there is nothing to pad",
    "length_penalty": "only used by beam search",
    "spaces_between_special_tokens": "byte-level decoding adds no spaces to join",
    "guided_decoding_backend": "the backend is always llguidance",
    "cache_salt": "there is no prefix cache to salt",
    "kv_transfer_params, vllm_xargs, mm_processor_kwargs": "no KV transfer, no extensions",
    "include_reasoning, reasoning_effort, verbosity": "the models here do not reason",
    "modalities, audio, prediction": "text in, text out",
}
# Refused at any value but the neutral one, with a 400 saying so.
REFUSED = (
    "use_beam_search",
    "prompt_embeds",
    "logits_processors",
    "structural_tag",
    "priority (non-zero)",
    "suffix",
    "tool_choice: auto",
    "functions",
    "web_search_options",
)


class StreamOptions(Strict):
    """`stream_options`: whether the last chunk (or every chunk) carries the usage."""

    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM: usage in every chunk
    include_obfuscation: bool | None = None  # accepted, ignored (there is nothing to pad)


def _is_ids(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def _neutral(field: str, v: object, neutral: object = None) -> None:
    if v is not None and v != neutral and v != [] and v != {}:
        raise ValueError(f"{field} is not supported by this server")


class _SamplingRequest(Strict):
    """The fields chat and completions share: the model, how to sample, structured output."""

    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float | None = Field(None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # ignored
    response_format: ResponseFormat | None = None
    # ---- vLLM's sampling extensions
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    use_beam_search: bool = False
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    length_penalty: float = 1.0  # ignored (beam search only)
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # ignored
    truncate_prompt_tokens: int | None = Field(None, ge=1)
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # ---- vLLM's other extensions
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # ignored: llguidance
    guided_whitespace_pattern: str | None = None
    structured_outputs: StructuredOutputs | None = None
    priority: int = 0
    request_id: str | None = Field(None, min_length=1, max_length=256)
    logits_processors: list[Any] | None = None
    return_tokens_as_token_ids: bool | None = None
    cache_salt: str | None = None  # ignored
    kv_transfer_params: dict[str, Any] | None = None  # ignored
    vllm_xargs: dict[str, str | int | float] | None = None  # ignored
    mm_processor_kwargs: dict[str, Any] | None = None  # ignored

    @field_validator("stop", mode="plain")
    @classmethod
    def _stop(cls, v: object) -> str | list[str] | None:
        if v is None or (isinstance(v, str) and v):
            return v
        if isinstance(v, list) and len(v) <= MAX_STOP and all(isinstance(s, str) and s for s in v):
            return v
        raise ValueError(f"stop must be a non-empty string or a list of at most {MAX_STOP}")

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            # ASCII digits only: str.isdigit() also takes "²", which int() refuses
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"logit_bias keys are token ids; got {key!r}")
        return v

    @field_validator("stop_token_ids", "allowed_token_ids")
    @classmethod
    def _token_ids(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(t < 0 for t in v):
            raise ValueError("token ids must be non-negative")
        return v

    @field_validator("use_beam_search")
    @classmethod
    def _no_beams(cls, v: bool) -> bool:
        if v:
            raise ValueError("use_beam_search is not supported; sample, or use best_of")
        return v

    @field_validator("priority")
    @classmethod
    def _no_priority(cls, v: int) -> int:
        if v:
            raise ValueError("priority must be 0: the scheduler does not order by priority")
        return v

    @field_validator("logits_processors")
    @classmethod
    def _no_processors(cls, v: list[Any] | None) -> list[Any] | None:
        _neutral("logits_processors", v)
        return v

    def check(self) -> None:
        """Checks across fields, after parsing: InvalidSamplingParamsError (400) naming one.

        Not a pydantic validator: those report no field for a check across fields.
        """
        if self.best_of is not None and self.best_of < self.n:
            raise InvalidSamplingParamsError(
                f"best_of ({self.best_of}) must be at least n ({self.n})", "best_of"
            )
        if self.best_of is not None and self.best_of > self.n and self.stream:
            raise InvalidSamplingParamsError("best_of > n cannot be streamed", "best_of")
        if self.prompt_logprobs and self.stream:
            raise InvalidSamplingParamsError(
                "prompt_logprobs are not available when streaming (as vLLM)", "prompt_logprobs"
            )
        self.structured()  # one kind of structured output at most

    @property
    def include_usage(self) -> bool:
        o = self.stream_options
        return o is not None and bool(o.include_usage or o.continuous_usage_stats)

    @property
    def continuous_usage(self) -> bool:
        o = self.stream_options
        return o is not None and bool(o.continuous_usage_stats)

    @property
    def candidates(self) -> int:
        """Engine requests per prompt: best_of, which the n best of are returned."""
        return self.best_of or self.n

    def structured(self) -> StructuredOutput | None:
        """The structured output asked for (by whichever field), or None."""
        return structured_output(
            self.response_format,
            self.structured_outputs,
            {
                "guided_json": self.guided_json,
                "guided_regex": self.guided_regex,
                "guided_choice": self.guided_choice,
                "guided_grammar": self.guided_grammar,
            },
            self.guided_whitespace_pattern,
        )

    def sampling_params(
        self,
        max_tokens: int,
        logprobs: int | None,
        choice: int,
        structured: StructuredOutput | None,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        """The engine's params for candidate `choice` of a prompt.

        Candidates of a seeded request get seeds seed, seed+1, ...: reproducible, yet not n
        copies of one text. The fields' own validators checked the rest; what is left is
        checked here, where the engine's params are made, as it always was.
        """
        if self.allowed_token_ids == []:
            raise InvalidSamplingParamsError(
                "allowed_token_ids must be a non-empty list of token ids", "allowed_token_ids"
            )
        if any(not w for w in self.bad_words or ()):
            raise InvalidSamplingParamsError("bad_words must be non-empty strings", "bad_words")
        temperature = 1.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        if temperature < GREEDY_BELOW or top_p == 0.0:
            temperature, top_p = 0.0, 1.0
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        bias = tuple(
            (int(k), min(max(v, -MAX_BIAS), MAX_BIAS)) for k, v in (self.logit_bias or {}).items()
        )
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=self.top_k if self.top_k is not None and self.top_k > 0 else None,
            min_p=self.min_p or 0.0,
            seed=None if self.seed is None else self.seed + choice,
            stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            min_tokens=min(self.min_tokens, max_tokens),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias=bias,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            structured=structured,
            skip_special_tokens=self.skip_special_tokens,
            allowed_token_ids=tuple(self.allowed_token_ids)
            if self.allowed_token_ids is not None
            else None,
            bad_words=tuple(self.bad_words or ()),
        )


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: Prompt
    max_tokens: int | None = Field(16, ge=0)  # 0 only with echo: the prompt's logprobs alone
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    suffix: str | None = None
    add_special_tokens: bool = True  # vLLM: BOS and the like, as the tokenizer adds them
    prompt_embeds: Any = None

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

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported")
        return v

    @field_validator("prompt_embeds", mode="plain")
    @classmethod
    def _no_embeds(cls, v: object) -> object:
        _neutral("prompt_embeds", v)
        return v

    def check(self) -> None:
        super().check()
        if self.max_tokens == 0 and not self.echo:
            raise InvalidSamplingParamsError(
                "max_tokens 0 needs echo (the prompt's logprobs alone)", "max_tokens"
            )

    def prompts(self) -> list[str] | list[list[int]]:
        """The batch: one entry per prompt, text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if _is_ids(p):
            return [cast(list[int], p)]
        return cast(list[str] | list[list[int]], p)

    def params(self, choice: int, logprobs: int | None) -> SamplingParams:
        """Candidate `choice`'s params; `logprobs` as the handler needs them (best_of ranks
        candidates by theirs)."""
        prompt_logprobs = self.prompt_logprobs
        if prompt_logprobs is None and self.echo and self.logprobs is not None:
            prompt_logprobs = self.logprobs
        max_tokens = 16 if self.max_tokens is None else self.max_tokens
        return self.sampling_params(
            max_tokens, logprobs, choice, self.structured(), prompt_logprobs
        )


class TextPart(Strict):
    """A text part of a message's content."""

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message. Other keys (`refusal`, `tool_calls`, ...) are allowed and passed to the
    chat template, so a client can send back the messages it received."""

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
        msg = {k: v for k, v in (self.model_extra or {}).items() if v is not None}
        msg["role"] = "system" if self.role == "developer" else self.role
        msg["content"] = self.text()
        if self.name is not None:
            msg["name"] = self.name
        return msg


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI; still honoured
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # ignored
    functions: list[dict[str, Any]] | None = None  # OpenAI's deprecated tools
    function_call: str | dict[str, Any] | None = None  # OpenAI's deprecated tool_choice
    metadata: dict[str, str] | None = None  # ignored
    store: bool | None = None  # ignored
    service_tier: str | None = None  # ignored
    prompt_cache_key: str | None = None  # ignored
    safety_identifier: str | None = None  # ignored
    reasoning_effort: str | None = None  # ignored
    verbosity: str | None = None  # ignored
    modalities: list[Literal["text"]] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None  # ignored
    web_search_options: dict[str, Any] | None = None
    # ---- vLLM's chat extensions
    echo: bool = False  # prepend the last message's content when it is the assistant's
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    include_reasoning: bool = True  # ignored

    @field_validator("functions", "function_call", "web_search_options", "audio")
    @classmethod
    def _not_these(cls, v: object, info: ValidationInfo) -> object:
        assert info.field_name is not None
        _neutral(info.field_name, v, "none")
        return v

    def check(self) -> None:
        if self.top_logprobs and not self.logprobs:
            raise InvalidSamplingParamsError(
                "top_logprobs needs logprobs set to true", "top_logprobs"
            )
        if self.continue_final_message and self.add_generation_prompt:
            raise InvalidSamplingParamsError(
                "continue_final_message needs add_generation_prompt set to false",
                "continue_final_message",
            )
        choice = self.tool_choice
        if choice is not None and choice != "none" and not self.tools:
            raise InvalidSamplingParamsError("tool_choice needs tools", "tool_choice")
        if self.tools and (choice is None or choice == "auto"):
            raise InvalidSamplingParamsError(
                "tool_choice 'auto' (the default with tools) needs a tool-call parser for the "
                "model, which this server does not have: send tool_choice 'required', a named "
                "function, or 'none'",
                "tool_choice",
            )
        if isinstance(choice, NamedToolChoice) and choice.function.name not in self.tool_names():
            raise InvalidSamplingParamsError(
                f"tool_choice names {choice.function.name!r}, which is not in tools",
                "tool_choice",
            )
        if self.tool_schema() is not None and super().structured() is not None:
            raise InvalidSamplingParamsError(
                "use either tools or structured output, not both", "tool_choice"
            )
        super().check()

    def tool_names(self) -> list[str]:
        return [t.function.name for t in self.tools or ()]

    def tool_schema(self) -> dict[str, Any] | None:
        """The JSON schema a forced tool call must match (vLLM's), or None."""
        return forced_schema(self.tools, self.tool_choice)

    def structured(self) -> StructuredOutput | None:
        schema = self.tool_schema()
        if schema is not None:
            return StructuredOutput(
                "json_schema", json.dumps(schema), "tool_choice", self.guided_whitespace_pattern
            )
        return super().structured()

    def requested_max_tokens(self) -> int | None:
        """max_completion_tokens, else max_tokens; None: up to the model's context."""
        return self.max_completion_tokens or self.max_tokens

    def params(self, max_tokens: int, choice: int, logprobs: int | None) -> SamplingParams:
        return self.sampling_params(
            max_tokens, logprobs, choice, self.structured(), self.prompt_logprobs
        )

    def requested_logprobs(self) -> int | None:
        """Top-n logprobs per token the client asked for; None: none."""
        return (self.top_logprobs or 0) if self.logprobs else None
