"""The sampler: greedy, seeded temperature / top-k / top-p sampling, logprobs, step seeds; the
per-request controls (penalties over the token history, bias, bans, masks, min_p)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

from muxserve.runner.sampler import apply_controls, sample, step_seed
from muxserve.runner.token_history import HistoryGapError, TokenHistory
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


# ---- per-request controls (penalties, bias, bans, masks, min_p) ------------------------------
def history_of(tokens: list[int], prompt_len: int, vocab: int) -> TokenHistory:
    h = TokenHistory()
    h.feed("r", 0, tokens, None)
    h.tensors(prompt_len, vocab, torch.device("cpu"))
    return h


def test_penalties_follow_vllm_formulas_exactly() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0, 0.0, -0.5]])
    prompt, output = [1, 2], [3, 3, 4]  # prompt tokens 1, 2; generated 3 twice, 4 once
    s = SeqWork(
        "r",
        (4,),
        4,  # the last generated token is fed at position 4: prompt 2 + step 3 = 5 tokens
        NO_TABLE,
        True,
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0),
        0,
        3,
    )
    h = TokenHistory()
    h.feed("r", 0, [*prompt, *output], None)
    out = apply_controls(logits, [s], {"r": h})[0].tolist()
    expected = logits[0].tolist()
    for t in (1, 2, 3, 4):  # repetition: prompt and generated; positive / rp, negative x rp
        expected[t] = expected[t] / 2.0 if expected[t] > 0 else expected[t] * 2.0
    expected[3] -= 0.25 * 2 + 0.5  # frequency x count + presence, generated tokens only
    expected[4] -= 0.25 * 1 + 0.5
    assert out == pytest.approx(expected, abs=0)
    assert logits[0, 3].item() == 3.0  # the input is not modified


def test_controls_of_one_row_never_touch_another() -> None:
    vocab = 64
    logits = random_logits(4, vocab, seed=11)
    mask = np.zeros(2, dtype=np.int32)
    mask[0] = 0b1011  # tokens 0, 1, 3
    seqs = [
        seq("bias", logit_bias=((5, 50.0), (6, -50.0))),
        seq("plain"),
        replace_seq(seq("banned", min_tokens=4, max_tokens=8), banned=frozenset({2, 9})),
        replace_seq(seq("masked"), allowed=mask),
    ]
    batched = apply_controls(logits, seqs, {})
    for i, s in enumerate(seqs):
        alone = apply_controls(logits[i : i + 1], [s], {})
        assert torch.equal(batched[i], alone[0]), s.request_id
    assert torch.equal(batched[1], logits[1])
    assert batched[0, 5] == logits[0, 5] + 50 and batched[0, 6] == logits[0, 6] - 50
    assert batched[2, [2, 9]].tolist() == [float("-inf")] * 2
    allowed = torch.isfinite(batched[3]).nonzero().flatten().tolist()
    assert allowed == [0, 1, 3]  # and nothing past the mask's 64 bits


def test_a_mask_shorter_than_the_logits_allows_none_past_it() -> None:
    logits = torch.zeros(1, 40)
    s = replace_seq(seq("m"), allowed=np.array([-1], dtype=np.int32))  # tokens 0..31 allowed
    out = apply_controls(logits, [s], {})
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == list(range(32))


def test_greedy_and_seeded_sampling_obey_the_controls() -> None:
    logits = random_logits(2, 30, seed=12)
    forced = [
        seq("g", temperature=0.0, logit_bias=((7, 100.0),)),
        seq("s", seed=1, temperature=1.5, logit_bias=((9, 100.0),)),
    ]
    assert tokens_of(logits, forced) == [7, 9]


def test_min_p_keeps_tokens_within_a_factor_of_the_top() -> None:
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = torch.tensor(np.log(probs), dtype=torch.float32)
    counts = draws(logits, 600, temperature=1.0, min_p=0.35)  # keeps p >= 0.175: 0.5 and 0.3
    assert counts[[2, 3]].tolist() == [0, 0]
    assert chi_square(counts, np.array([0.5, 0.3, 0, 0]) / 0.8) < 15.0
    assert draws(logits, 50, temperature=2.0, min_p=1.0).tolist() == [50, 0, 0, 0]


def test_penalised_seeded_sampling_is_batch_invariant() -> None:
    vocab = 100
    target = random_logits(1, vocab, seed=13, scale=0.5)
    params = {"temperature": 1.0, "presence_penalty": 1.0, "repetition_penalty": 1.5}
    mine = SeqWork("me", (5,), 3, NO_TABLE, True, SamplingParams(**params), 42, 1)
    histories = {"me": history_of([1, 2, 5, 5], 3, vocab)}
    alone = sample(target, [mine], histories).token_ids.tolist()
    others = [seq(f"o{i}", seed=i, temperature=0.7, logit_bias=((i, 5.0),)) for i in range(3)]
    batch = torch.cat([random_logits(3, vocab, seed=14), target])
    assert sample(batch, [*others, mine], histories).token_ids.tolist()[3] == alone[0]


def test_token_history_skips_what_it_has_and_refuses_a_gap() -> None:
    vocab, dev = 10, torch.device("cpu")
    h = TokenHistory()
    h.feed("r", 0, [1, 2, 3], None)  # a prefill chunk
    h.feed("r", 3, [4], None)  # the next chunk
    h.feed("r", 0, [1, 2, 3, 4, 7], None)  # recomputed after a preemption, one token more
    assert h.tokens == [1, 2, 3, 4, 7]
    seen, counts = h.tensors(4, vocab, dev)  # prompt: positions 0..3
    assert seen.nonzero().flatten().tolist() == [1, 2, 3, 4]
    assert counts.tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 0, 0]
    h.feed("r", 5, [7], None)
    assert h.tensors(4, vocab, dev)[1][7].item() == 2  # counted once each, incrementally
    late = TokenHistory()  # a decode runner that did not see the prefill
    with pytest.raises(HistoryGapError, match="position 5"):
        late.feed("r", 5, [7], None)
    late.feed("r", 5, [7], history=[1, 2, 3, 4, 7])
    assert late.tokens == [1, 2, 3, 4, 7, 7]


def replace_seq(s: SeqWork, **fields: Any) -> SeqWork:
    return SeqWork(
        s.request_id,
        s.token_ids,
        s.start_pos,
        s.block_table,
        s.sample,
        s.params,
        s.seed,
        s.step,
        **fields,
    )
