"""The sampler: greedy, seeded temperature / top-k / top-p sampling, logprobs, step seeds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

from muxserve.runner.sampler import sample, step_seed
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import SeqResult, SeqWork

NO_TABLE = np.zeros((0, 1, 1), dtype=np.int32)


def seq(rid: str = "r", *, seed: int = 0, step: int = 0, **params: Any) -> SeqWork:
    """A sequence that samples, with the given SamplingParams fields."""
    return SeqWork(rid, (1,), 0, NO_TABLE, True, SamplingParams(**params), seed, step)


def tokens_of(logits: torch.Tensor, seqs: Sequence[SeqWork]) -> list[int]:
    return sample(logits, seqs).token_ids.tolist()


def random_logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def draws(logits: torch.Tensor, n: int, **params: Any) -> np.ndarray:
    """Token counts of `n` draws from one row of logits, seeds 0..n-1 (fixed, so never flaky)."""
    seqs = [seq(f"r{s}", seed=s, **params) for s in range(n)]
    tokens = tokens_of(logits.expand(n, -1), seqs)
    return np.bincount(tokens, minlength=logits.shape[-1])


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "drew a token of probability 0"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# ---- greedy --------------------------------------------------------------------------------
def test_greedy_is_argmax() -> None:
    logits = random_logits(6, 50, seed=0)
    seqs = [seq(f"r{i}", seed=i, step=i, temperature=0.0) for i in range(6)]
    batch = sample(logits, seqs)
    assert batch.token_ids.tolist() == logits.argmax(-1).tolist()
    results = batch.to_results()
    assert results == [SeqResult(f"r{i}", int(t)) for i, t in enumerate(logits.argmax(-1).tolist())]
    assert all(r.logprob is None and r.top_logprobs == () for r in results)


def test_greedy_ignores_top_k_top_p_and_half_precision_logits() -> None:
    logits = random_logits(4, 30, seed=1).to(torch.bfloat16)
    seqs = [seq(f"r{i}", temperature=0.0, top_k=3, top_p=0.5) for i in range(4)]
    assert tokens_of(logits, seqs) == logits.float().argmax(-1).tolist()


# ---- seeds ---------------------------------------------------------------------------------
def test_same_seed_and_step_give_the_same_token_whatever_the_batch() -> None:
    vocab = 200
    target = random_logits(1, vocab, seed=2, scale=0.5)[0]  # flat: many tokens are likely
    others = random_logits(5, vocab, seed=3, scale=0.5)
    for seed, step in [(0, 0), (1, 0), (7, 3), (123456789, 41), (-5, 2)]:
        mine = seq("me", seed=seed, step=step, temperature=1.0, top_p=0.95)
        alone = tokens_of(target[None], [mine])[0]
        rest = [
            seq("g", temperature=0.0),
            seq("x", seed=seed, step=step + 1, temperature=0.8),
            seq("y", seed=seed + 1, step=step, temperature=1.3, top_k=20),
            seq("z", seed=99, step=0, temperature=1.0),
            seq("w", seed=seed, step=step, temperature=1.0, top_p=0.95),  # a twin: same draw
        ]
        for place in range(len(rest) + 1):
            order = [*rest[:place], mine, *rest[place:]]
            rows = [*others[:place], target[None], *others[place:]]
            got = tokens_of(torch.cat([r.reshape(1, vocab) for r in rows]), order)
            assert got[place] == alone, (seed, step, place)
        twin = tokens_of(torch.stack([others[0], target]), [rest[4], mine])
        assert twin[1] == alone


def test_different_steps_and_seeds_draw_differently() -> None:
    flat = torch.zeros(1, 1000)  # uniform over 1000 tokens
    by_step = [tokens_of(flat, [seq(seed=5, step=s)])[0] for s in range(20)]
    by_seed = [tokens_of(flat, [seq(seed=s, step=5)])[0] for s in range(20)]
    assert len(set(by_step)) >= 18
    assert len(set(by_seed)) >= 18
    assert by_step != by_seed


def test_sampling_is_reproducible() -> None:
    logits = random_logits(8, 100, seed=4, scale=1.0)
    seqs = [seq(f"r{i}", seed=i, step=3 * i, temperature=0.9, top_k=50) for i in range(8)]
    assert tokens_of(logits, seqs) == tokens_of(logits.clone(), seqs)


# ---- top-k and top-p -----------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_top_k_1_and_tiny_top_p_equal_greedy(temperature: float) -> None:
    logits = random_logits(40, 64, seed=5, scale=1.0)
    greedy = logits.argmax(-1).tolist()
    for params in ({"top_k": 1}, {"top_p": 1e-6}):
        seqs = [seq(f"r{i}", seed=i, step=i, temperature=temperature, **params) for i in range(40)]
        assert tokens_of(logits, seqs) == greedy, params


def test_top_k_never_leaves_the_top_k() -> None:
    logits = random_logits(50, 40, seed=6, scale=0.3)  # flat, so the tail would often win
    for k in (2, 5):
        seqs = [seq(f"r{i}", seed=i, temperature=2.0, top_k=k) for i in range(50)]
        top = logits.topk(k, dim=-1).indices.tolist()
        got = tokens_of(logits, seqs)
        assert all(t in row for t, row in zip(got, top, strict=True))
        assert len(set(got)) > k  # different rows really drew from different top-k sets


def test_top_k_larger_than_the_vocab_keeps_everything() -> None:
    logits = torch.zeros(1, 4)
    counts = draws(logits[0], 400, temperature=1.0, top_k=10)
    assert (counts > 0).all()


def test_top_p_keeps_exactly_the_nucleus() -> None:
    # probabilities 0.5, 0.3, 0.15, 0.05 at shuffled token ids
    probs = np.array([0.05, 0.3, 0.15, 0.5])
    logits = torch.tensor(np.log(probs), dtype=torch.float32)
    # top_p 0.7: 0.5 then 0.3 (mass before it 0.5 < 0.7); 0.15 has 0.8 before it: dropped
    counts = draws(logits, 600, temperature=1.0, top_p=0.7)
    assert counts[[0, 2]].tolist() == [0, 0]
    assert chi_square(counts, np.array([0, 0.3, 0, 0.5]) / 0.8) < 15.0
    # top_p 0.85: 0.15 (0.8 before it) joins, 0.05 (0.95 before it) does not
    counts = draws(logits, 600, temperature=1.0, top_p=0.85)
    assert counts[0] == 0
    assert chi_square(counts, np.array([0, 0.3, 0.15, 0.5]) / 0.95) < 15.0


# ---- the distribution ----------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_frequencies_follow_softmax_of_logits_over_temperature(temperature: float) -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    counts = draws(logits, 3000, temperature=temperature)
    probs = torch.softmax(logits / temperature, -1).double().numpy()
    # 5 degrees of freedom: chi-square above 20 has probability ~0.1%; the seeds are fixed
    assert chi_square(counts, probs) < 20.0


def test_frequencies_under_top_k_follow_the_renormalised_top_k() -> None:
    logits = torch.tensor([0.0, 2.0, -1.0, 1.0, 0.5])
    counts = draws(logits, 2000, temperature=1.5, top_k=3)
    kept = torch.tensor([False, True, False, True, True])
    probs = torch.softmax((logits / 1.5).masked_fill(~kept, float("-inf")), -1)
    assert chi_square(counts, probs.double().numpy()) < 20.0


# ---- logprobs ------------------------------------------------------------------------------
def test_logprobs_are_of_the_raw_logits_with_sorted_top_lists() -> None:
    logits = random_logits(4, 80, seed=8)
    seqs = [
        seq("greedy5", temperature=0.0, logprobs=5),
        seq("hot2", seed=1, temperature=0.5, logprobs=2),
        seq("only", seed=2, temperature=1.5, logprobs=0),
        seq("max", seed=3, temperature=1.0, top_k=10, logprobs=20),
    ]
    results = sample(logits, seqs).to_results()
    logp = torch.log_softmax(logits, -1)  # not of logits / temperature, nor after top-k
    assert [r.request_id for r in results] == ["greedy5", "hot2", "only", "max"]
    assert results[0].token_id == int(logits[0].argmax())
    for row, (r, n) in enumerate(zip(results, (5, 2, 0, 20), strict=True)):
        assert r.token_id is not None
        assert r.logprob == pytest.approx(logp[row, r.token_id].item(), abs=1e-6)
        assert len(r.top_logprobs) == n
        ids = [t for t, _ in r.top_logprobs]
        values = [lp for _, lp in r.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert ids == logp[row].topk(n).indices.tolist()
        for t, lp in r.top_logprobs:
            assert lp == pytest.approx(logp[row, t].item(), abs=1e-6)
    assert results[0].top_logprobs[0] == (
        results[0].token_id,
        pytest.approx(results[0].logprob, abs=1e-7),
    )


def test_rows_without_logprobs_get_no_top_list_in_a_batch_with_logprobs() -> None:
    logits = random_logits(3, 30, seed=9)
    seqs = [seq("a", temperature=0.0), seq("b", temperature=0.0, logprobs=3), seq("c", seed=1)]
    results = sample(logits, seqs).to_results()
    assert results[0].top_logprobs == ()
    assert results[2].top_logprobs == ()
    assert len(results[1].top_logprobs) == 3


def test_rows_without_logprobs_get_no_logprob_in_a_batch_with_logprobs() -> None:
    logits = random_logits(2, 30, seed=9)
    results = sample(logits, [seq("a", temperature=0.0), seq("b", logprobs=3)]).to_results()
    assert results[0].logprob is None


# ---- step_seed -----------------------------------------------------------------------------
def test_step_seed_is_deterministic_in_range_and_distinct() -> None:
    assert step_seed(0, 0) == 0xBF58476D1CE4E5B9 & 0x7FFF_FFFF_FFFF_FFFF
    assert step_seed(12345, 6) == step_seed(12345, 6)
    grid = [step_seed(seed, step) for seed in range(-8, 64) for step in range(64)]
    assert all(0 <= s < 2**63 for s in grid)
    assert len(set(grid)) == len(grid)
    for seed in (2**64 + 3, -(2**70)):  # any Python int seed maps into the generator's range
        assert 0 <= step_seed(seed, 0) < 2**63
        torch.Generator().manual_seed(step_seed(seed, 0))


def test_step_seed_spreads_over_the_bits() -> None:
    grid = np.array(
        [step_seed(seed, step) for seed in range(32) for step in range(32)], dtype=np.uint64
    )
    bits = (grid[:, None] >> np.arange(63, dtype=np.uint64)) & np.uint64(1)
    share = bits.mean(axis=0)
    assert share.min() > 0.3 and share.max() < 0.7  # every bit flips for about half the pairs
    # neighbouring steps of one seed differ in many bits, not just the low ones
    for seed in (0, 1, 999):
        for step in range(16):
            diff = step_seed(seed, step) ^ step_seed(seed, step + 1)
            assert bin(diff).count("1") >= 8, (seed, step)
