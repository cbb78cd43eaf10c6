"""What the engine works out for each token a request samples: its grammar's mask, the token
ids it may use (`allowed_token_ids`), and the bad words it must not complete.

These live in the engine process, beside the tokenizers (as vLLM v1 keeps grammars in its
scheduler); each sampling step carries the result to the runner in `SeqWork.allowed` and
`SeqWork.banned`, where the sampler applies it on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import SeqWork
from muxserve.structured_output import Constraint, GrammarCompiler
from muxserve.tokenizer import Tokenizer


@dataclass
class RequestControls:
    """One request's per-step controls; built when it is added."""

    model: str
    constraint: Constraint | None  # its grammar's state
    allowed: np.ndarray | None  # (ceil(vocab / 32),) int32: the token ids it may sample
    bad_words: tuple[tuple[int, ...], ...]  # token sequences it must not generate

    def banned_now(self, output: Sequence[int]) -> frozenset[int]:
        """Tokens that would complete a bad word after `output` (as vLLM: one-token words
        always, longer ones when the tokens before their last were just generated)."""
        banned = set()
        for word in self.bad_words:
            prefix = word[:-1]
            if not prefix or tuple(output[len(output) - len(prefix) :]) == prefix:
                banned.add(word[-1])
        return frozenset(banned)


class StepControls:
    """Builds each request's controls and fills them into the steps that sample."""

    def __init__(self, tokenizers: dict[str, Tokenizer], vocab_sizes: dict[str, int]) -> None:
        self._tokenizers = tokenizers
        self._vocab = vocab_sizes  # the models' logits width
        self._compilers: dict[str, GrammarCompiler] = {}

    def add(self, model: str, tokenizer: Tokenizer, vocab_size: int) -> None:
        """A model joined the engine."""
        self._tokenizers = {**self._tokenizers, model: tokenizer}
        self._vocab = {**self._vocab, model: vocab_size}

    def forget(self, model: str) -> None:
        """A model left the engine."""
        self._tokenizers = {n: t for n, t in self._tokenizers.items() if n != model}
        self._vocab = {n: v for n, v in self._vocab.items() if n != model}
        self._compilers.pop(model, None)

    def make(self, model: str, params: SamplingParams) -> RequestControls | None:
        """The controls `params` ask for (None: none); a 400-worthy error for a bad grammar."""
        if params.structured is None and params.allowed_token_ids is None and not params.bad_words:
            return None
        tokenizer = self._tokenizers[model]
        constraint = None
        if params.structured is not None:
            compiler = self._compilers.setdefault(model, GrammarCompiler(tokenizer))
            constraint = compiler.compile(params.structured)
        allowed = None
        if params.allowed_token_ids is not None:
            allowed = bitmask(params.allowed_token_ids, self._vocab[model])
        words: set[tuple[int, ...]] = set()
        for w in params.bad_words:  # as vLLM: the word alone and after a space
            for text in (w, " " + w.lstrip()):
                ids = tuple(tokenizer.encode(text, add_special_tokens=False))
                if ids:
                    words.add(ids)
        return RequestControls(model, constraint, allowed, tuple(sorted(words)))

    def fill(self, steps: Sequence[tuple[SeqWork, RequestControls, Sequence[int]]]) -> None:
        """Set `allowed` and `banned` of each sampling step from its request's controls and
        output so far. Grammar masks of one model are computed together, in parallel."""
        grammar: dict[str, list[tuple[SeqWork, RequestControls]]] = {}
        for s, c, output in steps:
            if c.constraint is not None:
                grammar.setdefault(c.model, []).append((s, c))
            elif c.allowed is not None:
                s.allowed = c.allowed
            if c.bad_words:
                s.banned = s.banned | c.banned_now(output)
        for model, items in grammar.items():
            constraints = [c.constraint for _, c in items if c.constraint is not None]
            masks = self._compilers[model].fill_masks(constraints)
            words = (self._vocab[model] + 31) // 32
            for (s, c), row in zip(items, masks, strict=True):
                mask = _fit(row, words)
                s.allowed = mask if c.allowed is None else mask & c.allowed


def bitmask(token_ids: Sequence[int], vocab: int) -> np.ndarray:
    """(ceil(vocab / 32),) int32 with the bits of `token_ids` set (those under `vocab`)."""
    bits = np.zeros(((vocab + 31) // 32) * 32, dtype=np.uint8)
    bits[[t for t in token_ids if t < vocab]] = 1
    return np.packbits(bits, bitorder="little").view(np.int32).copy()


def _fit(mask: np.ndarray, words: int) -> np.ndarray:
    """A mask over the tokenizer's vocabulary stretched or cut to the model's logits width
    (padding tokens past the tokenizer's are never allowed)."""
    if len(mask) == words:
        return mask
    if len(mask) > words:
        return mask[:words]
    return np.concatenate([mask, np.zeros(words - len(mask), dtype=np.int32)])
