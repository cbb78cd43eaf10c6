"""How to sample one request's tokens; validated at construction, torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field

from muxserve.errors import InvalidSamplingParamsError

MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request. Temperature 0 means greedy."""

    max_tokens: int = 16  # tokens to generate at most
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus mass, in (0, 1]
    top_k: int | None = None  # keep the k most likely tokens; None: all
    seed: int | None = None  # same seed, same prompt, same model: same text, whatever else runs
    stop: tuple[str, ...] = ()  # stop strings; not included in the output
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens; included in token ids, not text
    ignore_eos: bool = False  # keep going past the model's EOS token
    logprobs: int | None = None  # top-n logprobs per generated token (0: the sampled one only)
    skip_special_tokens: bool = True
    extra: dict[str, object] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        def bad(param: str, why: str) -> InvalidSamplingParamsError:
            return InvalidSamplingParamsError(f"{param} {why}", param=param)

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise bad("max_tokens", f"must be an integer, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            raise bad("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if not isinstance(self.temperature, (int, float)) or self.temperature != self.temperature:
            raise bad("temperature", f"must be a number, got {self.temperature!r}")
        if self.temperature < 0:
            raise bad("temperature", f"must be non-negative, got {self.temperature}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1
        ):
            raise bad("top_k", f"must be a positive integer or None, got {self.top_k!r}")
        if self.logprobs is not None and (
            isinstance(self.logprobs, bool)
            or not isinstance(self.logprobs, int)
            or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise bad("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "stop strings must be non-empty strings")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative integers")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise bad("seed", f"must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
