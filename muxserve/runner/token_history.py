"""A sequence's own tokens as one runner has seen them, counted on the device for penalties.

The runner learns a sequence's tokens from the jobs it runs: every chunk and decode step feeds
tokens at known positions, so nothing is sent twice. A runner that did not run the prefill (a
decode worker process) gets the tokens before its first step once, in `SeqWork.history`.
Positions it already has (a recomputed prefill after a preemption) are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class HistoryGapError(RuntimeError):
    """A step starts past the tokens the runner has of its sequence, and no history came."""


class TokenHistory:
    """One sequence's tokens, and on the device which are in its prompt and how often each
    was generated (what the penalties read)."""

    def __init__(self) -> None:
        self.tokens: list[int] = []  # positions [0, len) of the sequence
        self._counted = 0  # positions already in the device tensors
        self._prompt_seen: torch.Tensor | None = None  # (vocab,) bool: in the prompt
        self._output_counts: torch.Tensor | None = None  # (vocab,) float32: times generated

    def feed(
        self, request_id: str, start_pos: int, tokens: Sequence[int], history: Sequence[int] | None
    ) -> None:
        """Record the tokens a step feeds at `start_pos` (and `history`, positions before it)."""
        have = len(self.tokens)
        if history is not None and len(history) > have:
            self.tokens.extend(history[have:])
            have = len(self.tokens)
        if start_pos > have:
            raise HistoryGapError(
                f"{request_id}: a step at position {start_pos}, but this runner has only "
                f"{have} of its tokens and was sent no history"
            )
        self.tokens.extend(tokens[have - start_pos :])

    def tensors(
        self, prompt_len: int, vocab: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt tokens as a (vocab,) bool mask, output token counts as (vocab,) float32),
        brought up to date with the tokens fed since the last call."""
        if self._prompt_seen is None or self._output_counts is None:
            self._prompt_seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self._output_counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        end = len(self.tokens)
        if end > self._counted:
            start, self._counted = self._counted, end
            if start < prompt_len:
                ids = torch.tensor(self.tokens[start : min(end, prompt_len)], device=device)
                self._prompt_seen[ids] = True
            if end > prompt_len:
                ids = torch.tensor(self.tokens[max(start, prompt_len) : end], device=device)
                ones = torch.ones(len(ids), dtype=torch.float32, device=device)
                self._output_counts.index_add_(0, ids, ones)
        return self._prompt_seen, self._output_counts
