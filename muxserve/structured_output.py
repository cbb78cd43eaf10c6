"""Structured output: a request's grammar as a token mask per step (llguidance).

The engine compiles a request's `StructuredOutput` into a `Constraint` when it is added (a
400 if the grammar is invalid), asks it for the mask of each token it samples (sent with the
step in `SeqWork.allowed`, applied by the sampler on the device), and advances it with every
token the request generates. The masks of a step's constrained sequences are computed
together, in llguidance's own threads, outside the engine lock.

Why llguidance (and not xgrammar): it is a 3 MB wheel with no Python dependencies (xgrammar
pulls triton, transformers and a TVM runtime), it computes masks lazily per step with no
grammar pre-compilation cost (a schema compiles in well under a millisecond), it covers JSON
schema, regular expressions and Lark grammars with one API, and it is maintained by Microsoft
and used by vLLM, SGLang and llama.cpp. It is an optional extra: `pip install
'muxserve[structured]'`; without it, a structured request is a 400 that says so.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from muxserve.errors import InvalidSamplingParamsError
from muxserve.sampling_params import StructuredOutput

if TYPE_CHECKING:
    from muxserve.tokenizer import Tokenizer

# JSON with no optional whitespace: a small model cannot pad its output with endless blanks
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}
MAX_GRAMMAR_CHARS = 1 << 20  # a schema or grammar larger than this is refused


class Constraint:
    """One request's grammar state: the tokens it may sample next, and those it accepted."""

    def __init__(self, matcher: Any, words: int) -> None:
        self._matcher = matcher  # llguidance.LLMatcher
        self.words = words  # int32 words of a mask: ceil(vocab / 32)
        self.consumed = 0  # output tokens accepted so far

    def advance(self, tokens: Sequence[int]) -> bool:
        """Accept the request's output tokens past those accepted; False if one is refused."""
        new = list(tokens[self.consumed :])
        self.consumed = len(tokens)
        return not new or bool(self._matcher.consume_tokens(new))

    @property
    def done(self) -> bool:
        """The grammar is complete and nothing may follow (but the end of the sequence)."""
        return bool(self._matcher.is_stopped())

    @property
    def error(self) -> str:
        return str(self._matcher.get_error())


class GrammarCompiler:
    """Compiles requests' grammars for one model; its llguidance tokenizer is built once."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._llg_tokenizer: Any = None
        self._executor: Any = None
        self._lock = threading.Lock()

    def _ensure(self) -> Any:
        with self._lock:
            if self._llg_tokenizer is None:
                llg = _import_llguidance()
                tok = self._tokenizer
                self._llg_tokenizer = llg.LLTokenizer(
                    tok.backend_json(), n_vocab=tok.vocab_size, eos_token=sorted(tok.eos_token_ids)
                )
                self._executor = llg.LLExecutor()
            return self._llg_tokenizer

    def compile(self, spec: StructuredOutput) -> Constraint:
        """The request's constraint; InvalidSamplingParamsError (naming `spec.param`) if its
        grammar is invalid or llguidance is not installed."""
        llg_tokenizer = self._ensure()
        llg = _import_llguidance()
        grammar = _grammar(llg, spec)
        problem = llg.LLMatcher.validate_grammar(grammar, llg_tokenizer)
        if problem:
            raise InvalidSamplingParamsError(
                f"{spec.param}: invalid {spec.kind.replace('_', ' ')}: {problem.strip()}",
                spec.param,
            )
        matcher = llg.LLMatcher(llg_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidSamplingParamsError(f"{spec.param}: {matcher.get_error()}", spec.param)
        return Constraint(matcher, (llg_tokenizer.vocab_size + 31) // 32)

    def fill_masks(self, constraints: Sequence[Constraint]) -> np.ndarray:
        """The next-token masks of `constraints`, one (words,) int32 row each, computed in
        parallel."""
        from llguidance.numpy import fill_next_token_bitmask_par

        words = constraints[0].words
        masks = np.full((len(constraints), words), -1, dtype=np.int32)
        fill_next_token_bitmask_par(
            self._executor, [(c._matcher, i) for i, c in enumerate(constraints)], masks
        )
        return masks


def _grammar(llg: Any, spec: StructuredOutput) -> str:
    """llguidance's grammar text for a spec; InvalidSamplingParamsError for bad input."""
    options = JSON_OPTIONS
    if spec.whitespace_pattern is not None:
        options = {"whitespace_pattern": spec.whitespace_pattern}
    if len(spec.spec) > MAX_GRAMMAR_CHARS:
        raise InvalidSamplingParamsError(
            f"{spec.param}: over {MAX_GRAMMAR_CHARS} characters", spec.param
        )
    if spec.kind == "json_object":
        return str(llg.LLMatcher.grammar_from_json_schema({"type": "object"}, options))
    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.spec)
        except json.JSONDecodeError as e:
            raise InvalidSamplingParamsError(
                f"{spec.param}: the schema is not JSON ({e})", spec.param
            ) from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidSamplingParamsError(
                f"{spec.param}: a JSON schema is an object", spec.param
            )
        try:
            return str(llg.LLMatcher.grammar_from_json_schema(schema, options))
        except ValueError as e:
            raise InvalidSamplingParamsError(f"{spec.param}: {e}", spec.param) from None
    if spec.kind == "regex":
        return str(llg.LLMatcher.grammar_from_regex(spec.spec))
    if spec.kind == "choice":
        choices = json.loads(spec.spec)
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
        return str(llg.LLMatcher.grammar_from_lark(f"start: {alternatives}"))
    return str(llg.LLMatcher.grammar_from_lark(spec.spec))


def _import_llguidance() -> Any:
    try:
        import llguidance
    except ImportError:
        raise InvalidSamplingParamsError(
            "structured output needs llguidance on the server: pip install 'muxserve[structured]'",
            "response_format",
        ) from None
    return llguidance


def available() -> bool:
    """True when llguidance is installed (structured output can be served)."""
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True
