"""Turns logits into tokens: the per-request logit controls, greedy or seeded sampling, logprobs.

Every control works row by row (elementwise, or a reduction over one row), so a request's
controls never touch another row and a seeded request gives the same tokens whatever shares
its batch. A sampled token's randomness depends only on the request's seed and the index of
the token it samples, so a preempted request recomputes exactly the tokens it had.

Order (as vLLM): structured-output mask, stop tokens banned before min_tokens, logit_bias,
repetition / frequency / presence penalties; then greedy argmax, or temperature, min_p, top_k,
top_p and a seeded draw. Logprobs are of the model's own distribution, before any of these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from muxserve.runner.token_history import TokenHistory
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import SeqResult, SeqWork

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, step) over 63 bits
_NEG_INF = float("-inf")


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


def sample(
    logits: torch.Tensor,
    seqs: Sequence[SeqWork],
    histories: Mapping[str, TokenHistory] | None = None,
) -> SampledBatch:
    """Sample one token per row of `logits` (N, vocab), row i for `seqs[i]`.

    `histories` holds the token history of every sequence whose params have penalties.
    """
    raw = logits.float()
    processed = apply_controls(raw, seqs, histories or {})
    tokens = processed.argmax(dim=-1)  # greedy rows are done here
    for i, s in enumerate(seqs):
        if not s.params.greedy:
            tokens[i] = _sample_row(processed[i], s.params, step_seed(s.seed, s.step))
    want = [s.params.logprobs for s in seqs]
    if all(w is None for w in want):
        return SampledBatch([s.request_id for s in seqs], tokens, None, None, None, [])
    logp = torch.log_softmax(raw, dim=-1)  # of the model's distribution, as OpenAI reports
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


def apply_controls(
    logits: torch.Tensor, seqs: Sequence[SeqWork], histories: Mapping[str, TokenHistory]
) -> torch.Tensor:
    """`logits` (N, vocab) float32 after each row's mask, bans, bias and penalties.

    Returns `logits` itself when no row has any (the common case costs one pass over seqs).
    """
    masked = [i for i, s in enumerate(seqs) if s.allowed is not None]
    banned = [i for i, s in enumerate(seqs) if s.banned]
    biased = [i for i, s in enumerate(seqs) if s.params.logit_bias]
    penalised = [i for i, s in enumerate(seqs) if s.params.has_penalties]
    if not (masked or banned or biased or penalised):
        return logits
    out = logits.clone()
    device, vocab = out.device, out.shape[-1]
    if masked:
        masks = [np.asarray(seqs[i].allowed, dtype=np.int32) for i in masked]
        words = torch.from_numpy(np.stack(masks)).to(device)  # (R, ceil(vocab / 32)) int32
        allowed = _unpack_bits(words, vocab)  # (R, vocab) bool
        rows = torch.tensor(masked, device=device)
        out[rows] = out[rows].masked_fill(~allowed, _NEG_INF)
    if banned:
        r, c = _pairs([(i, t) for i in banned for t in seqs[i].banned if t < vocab], device)
        out[r, c] = _NEG_INF
    if biased:
        pairs = [(i, t, b) for i in biased for t, b in seqs[i].params.logit_bias if t < vocab]
        r, c = _pairs([(i, t) for i, t, _ in pairs], device)
        values = torch.tensor([b for _, _, b in pairs], dtype=out.dtype, device=device)
        out.index_put_((r, c), values, accumulate=True)
    if penalised:
        _apply_penalties(out, [seqs[i] for i in penalised], penalised, histories)
    return out


def _apply_penalties(
    out: torch.Tensor,
    seqs: Sequence[SeqWork],
    rows: list[int],
    histories: Mapping[str, TokenHistory],
) -> None:
    """vLLM's penalties on `out`'s `rows`: repetition over prompt and generated tokens,
    frequency and presence over generated tokens only."""
    device, vocab = out.device, out.shape[-1]
    prompt_seen, counts = [], []
    for s in seqs:
        prompt_len = s.start_pos + len(s.token_ids) - s.step  # at a sampling step: prompt + step
        seen, count = histories[s.request_id].tensors(prompt_len, vocab, device)
        prompt_seen.append(seen)
        counts.append(count)
    count = torch.stack(counts)  # (R, vocab) float32
    generated = count > 0
    idx = torch.tensor(rows, device=device)
    logits = out[idx]  # (R, vocab)

    def column(name: str) -> torch.Tensor:
        values = [float(getattr(s.params, name)) for s in seqs]
        return torch.tensor(values, dtype=out.dtype, device=device)[:, None]  # (R, 1)

    rep = column("repetition_penalty")
    seen = torch.stack(prompt_seen) | generated
    scaled = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, scaled, logits)
    logits = logits - column("frequency_penalty") * count
    logits = logits - column("presence_penalty") * generated.to(out.dtype)
    out[idx] = logits


def _pairs(pairs: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.tensor([r for r, _ in pairs], dtype=torch.int64, device=device)
    cols = torch.tensor([c for _, c in pairs], dtype=torch.int64, device=device)
    return rows, cols


def _unpack_bits(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """(R, W) int32 bitmasks -> (R, vocab) bool: bit j of word w is token 32 w + j."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = (words[:, :, None] >> shifts) & 1  # (R, W, 32)
    flat = bits.reshape(words.shape[0], -1).bool()  # (R, 32 W)
    if flat.shape[1] >= vocab:
        return flat[:, :vocab]
    # tokens past the mask (the model's padded vocabulary) are never allowed
    pad = torch.zeros(words.shape[0], vocab - flat.shape[1], dtype=torch.bool, device=words.device)
    return torch.cat([flat, pad], dim=1)


def _sample_row(logits: torch.Tensor, params: SamplingParams, seed: int) -> torch.Tensor:
    scaled = logits / params.temperature
    if params.min_p > 0.0:
        probs = torch.softmax(scaled, dim=-1)
        scaled = scaled.masked_fill(probs < params.min_p * probs.max(), _NEG_INF)
    if params.top_k is not None and params.top_k < scaled.numel():
        kth = scaled.topk(params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, _NEG_INF)
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = (sorted_p.cumsum(0) - sorted_p) >= params.top_p
        probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
    gen = torch.Generator(device=logits.device).manual_seed(seed)
    noise = torch.empty_like(probs).exponential_(generator=gen)
    return (probs / noise).argmax()  # exponential race: P(token i) = probs[i] / sum(probs)
