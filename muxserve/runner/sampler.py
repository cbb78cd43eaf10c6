"""Turns logits into tokens: greedy, temperature, top-k, top-p, seeds, logprobs.

A sampled token's randomness depends only on the request's seed and the index of the token
it samples, so a seeded request gives the same text whatever else shares its batch, and a
preempted request recomputes exactly the tokens it had.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import SeqResult, SeqWork

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, step) over 63 bits


def step_seed(seed: int, step: int) -> int:
    """The generator seed for token `step` of a request seeded with `seed`."""
    return ((seed * _MIX) ^ (step + 1) * 0xBF58476D1CE4E5B9) & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class SampledBatch:
    """Sampling results still on the device, converted to Python by `to_results`."""

    request_ids: list[str]
    token_ids: torch.Tensor  # (N,) int64
    logprobs: torch.Tensor | None  # (N,) float32, of the sampled tokens
    top_ids: torch.Tensor | None  # (N, k) int64
    top_logprobs: torch.Tensor | None  # (N, k) float32
    top_n: list[int | None]  # per row: how many of the top k to report; None: no logprobs

    def to_results(self) -> list[SeqResult]:
        tokens = self.token_ids.tolist()
        if self.logprobs is None:
            return [SeqResult(r, t) for r, t in zip(self.request_ids, tokens, strict=True)]
        assert self.top_ids is not None and self.top_logprobs is not None
        lps, tids, tlps = self.logprobs.tolist(), self.top_ids.tolist(), self.top_logprobs.tolist()
        return [
            SeqResult(r, t, lp, tuple(zip(ti[:n], tl[:n], strict=True)))
            if n is not None
            else SeqResult(r, t)
            for r, t, lp, ti, tl, n in zip(
                self.request_ids, tokens, lps, tids, tlps, self.top_n, strict=True
            )
        ]


def sample(logits: torch.Tensor, seqs: Sequence[SeqWork]) -> SampledBatch:
    """Sample one token per row of `logits` (N, vocab), row i for `seqs[i]`."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1)  # greedy rows are done here
    for i, s in enumerate(seqs):
        if not s.params.greedy:
            tokens[i] = _sample_row(logits[i], s.params, step_seed(s.seed, s.step))
    want = [s.params.logprobs for s in seqs]
    if all(w is None for w in want):
        return SampledBatch([s.request_id for s in seqs], tokens, None, None, None, [])
    logp = torch.log_softmax(logits, dim=-1)  # of the model's distribution, as OpenAI reports
    k = max(w or 0 for w in want)
    top = logp.topk(k, dim=-1) if k else None
    empty = torch.empty(len(seqs), 0, dtype=torch.int64, device=logits.device)
    return SampledBatch(
        request_ids=[s.request_id for s in seqs],
        token_ids=tokens,
        logprobs=logp.gather(1, tokens[:, None])[:, 0],
        top_ids=top.indices if top is not None else empty,
        top_logprobs=top.values if top is not None else empty.float(),
        top_n=want,
    )


def _sample_row(logits: torch.Tensor, params: SamplingParams, seed: int) -> torch.Tensor:
    scaled = logits / params.temperature
    if params.top_k is not None and params.top_k < scaled.numel():
        kth = scaled.topk(params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = (sorted_p.cumsum(0) - sorted_p) >= params.top_p
        probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
    gen = torch.Generator(device=logits.device).manual_seed(seed)
    noise = torch.empty_like(probs).exponential_(generator=gen)
    return (probs / noise).argmax()  # exponential race: P(token i) = probs[i] / sum(probs)
