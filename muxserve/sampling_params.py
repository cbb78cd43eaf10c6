"""How to sample one request's tokens: a plain typed record, torch-free.

A frozen dataclass that checks nothing itself: it is pickled to mesh engines and worker
processes as it is. Values from outside are checked once, at the edge they enter by: the HTTP
server's pydantic models (`server/protocol.py`), and `SamplingParams.checked` for the other
entry points (the command line, a library caller).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from muxserve.errors import InvalidSamplingParamsError

MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs
MAX_BIAS = 100.0  # OpenAI's range for logit_bias values: [-100, 100]
MAX_PENALTY = 2.0  # OpenAI's range for presence and frequency penalties: [-2, 2]

StructuredKind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match: a grammar the engine compiles per request.

    `spec` is text: a JSON schema (`json_schema`), a regular expression (`regex`), a JSON list
    of strings (`choice`), a Lark grammar (`grammar`); unused for `json_object` (any object).
    """

    kind: StructuredKind
    spec: str = ""
    param: str = "response_format"  # the request field it came from, for error messages
    whitespace_pattern: str | None = None  # JSON: the whitespace allowed between tokens
    # (a regex); None: none at all


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request. Temperature 0 means greedy.

    The logits of a step go through, in order (as vLLM): the structured-output mask, the
    stop tokens banned before `min_tokens`, `logit_bias`, the penalties, then temperature,
    `min_p`, `top_k`, `top_p`. Reported logprobs are of the model's own distribution.
    """

    max_tokens: int = 16  # tokens to generate at most; 0: none (prompt logprobs only)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus mass, in (0, 1]
    top_k: int | None = None  # keep the k most likely tokens; None: all
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one; 0: off
    seed: int | None = None  # same seed, same prompt, same model: same text, whatever else runs
    stop: tuple[str, ...] = ()  # stop strings; not in the output unless include_stop_str...
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens; included in token ids, not text
    include_stop_str_in_output: bool = False  # keep the matched stop string (or stop token)
    ignore_eos: bool = False  # keep going past the model's EOS token
    min_tokens: int = 0  # EOS and stop tokens are masked (and stop strings unchecked) until then
    presence_penalty: float = 0.0  # minus this for every token already generated
    frequency_penalty: float = 0.0  # minus this times how often it was generated
    repetition_penalty: float = 1.0  # divides (>0) or multiplies (<0) the logits of prompt and
    # generated tokens; 1: off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: int | None = None  # top-n logprobs per generated token (0: the sampled one only)
    prompt_logprobs: int | None = None  # top-n logprobs per prompt token (0: the token's own)
    structured: StructuredOutput | None = None  # the grammar the output must match
    allowed_token_ids: tuple[int, ...] | None = None  # sample only these; None: any
    bad_words: tuple[str, ...] = ()  # words never generated (their last token is masked
    # whenever the tokens before it were just generated)
    skip_special_tokens: bool = True

    @classmethod
    def checked(cls, **fields: Any) -> SamplingParams:
        """The params from `fields`, checked: InvalidSamplingParamsError names the first bad
        one."""
        params = cls(**fields)
        check_sampling_params(params)
        return params

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """True when sampling reads the sequence's own tokens (so the runner keeps them)."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


def check_sampling_params(params: SamplingParams) -> None:
    """InvalidSamplingParamsError naming the first field of `params` out of its range."""

    def bad(param: str, why: str) -> InvalidSamplingParamsError:
        return InvalidSamplingParamsError(f"{param} {why}", param=param)

    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v

    if not is_int(params.max_tokens):
        raise bad("max_tokens", f"must be an integer, got {params.max_tokens!r}")
    if params.max_tokens < 0:
        raise bad("max_tokens", f"must be at least 0, got {params.max_tokens}")
    if not is_number(params.temperature):
        raise bad("temperature", f"must be a number, got {params.temperature!r}")
    if params.temperature < 0:
        raise bad("temperature", f"must be non-negative, got {params.temperature}")
    if not is_number(params.top_p) or not 0.0 < params.top_p <= 1.0:
        raise bad("top_p", f"must be in (0, 1], got {params.top_p!r}")
    if params.top_k is not None and (not is_int(params.top_k) or params.top_k < 1):
        raise bad("top_k", f"must be a positive integer or None, got {params.top_k!r}")
    if not is_number(params.min_p) or not 0.0 <= params.min_p <= 1.0:
        raise bad("min_p", f"must be in [0, 1], got {params.min_p!r}")
    for name in ("logprobs", "prompt_logprobs"):
        v = getattr(params, name)
        if v is not None and (not is_int(v) or not 0 <= v <= MAX_LOGPROBS):
            raise bad(name, f"must be in [0, {MAX_LOGPROBS}], got {v}")
    if any(not isinstance(s, str) or not s for s in params.stop):
        raise bad("stop", "stop strings must be non-empty strings")
    if any(not is_int(t) or t < 0 for t in params.stop_token_ids):
        raise bad("stop_token_ids", "must be non-negative integers")
    if params.seed is not None and not is_int(params.seed):
        raise bad("seed", f"must be an integer, got {params.seed!r}")
    if not is_int(params.min_tokens) or not 0 <= params.min_tokens <= max(params.max_tokens, 0):
        raise bad(
            "min_tokens",
            f"must be an integer in [0, max_tokens={params.max_tokens}], got {params.min_tokens!r}",
        )
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(params, name)
        if not is_number(v) or not -MAX_PENALTY <= v <= MAX_PENALTY:
            raise bad(name, f"must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {v!r}")
    rp = params.repetition_penalty
    if not is_number(rp) or not 0.0 < rp < float("inf"):
        raise bad("repetition_penalty", f"must be a positive number, got {rp!r}")
    for pair in params.logit_bias:
        if (
            not isinstance(pair, tuple)
            or len(pair) != 2
            or not is_int(pair[0])
            or pair[0] < 0
            or not is_number(pair[1])
            or not -MAX_BIAS <= pair[1] <= MAX_BIAS
        ):
            raise bad(
                "logit_bias",
                f"must map token ids to numbers in [-{MAX_BIAS:g}, {MAX_BIAS:g}], got {pair!r}",
            )
    ids = params.allowed_token_ids
    if ids is not None and (not ids or any(not is_int(t) or t < 0 for t in ids)):
        raise bad("allowed_token_ids", "must be a non-empty list of token ids")
    if any(not isinstance(w, str) or not w for w in params.bad_words):
        raise bad("bad_words", "must be non-empty strings")
    if params.structured is not None and not isinstance(params.structured, StructuredOutput):
        raise bad("structured", f"must be a StructuredOutput, got {params.structured!r}")
