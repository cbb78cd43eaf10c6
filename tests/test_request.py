"""Request: what it derives from its params once, for the scheduler's loops over every step."""

from __future__ import annotations

from muxserve.request import Request
from muxserve.sampling_params import SamplingParams


def make(eos: frozenset[int] = frozenset({2}), **params: object) -> Request:
    return Request("r", "a", [5, 6], SamplingParams(**params), 0.0, 0, eos)  # type: ignore[arg-type]


def test_stop_ids_are_eos_and_the_stop_tokens() -> None:
    assert make().stop_ids == frozenset({2})
    assert make(stop_token_ids=(9, 7)).stop_ids == frozenset({2, 7, 9})
    assert make(frozenset(), stop_token_ids=(9,)).stop_ids == frozenset({9})


def test_ignore_eos_leaves_only_the_stop_tokens() -> None:
    assert make(ignore_eos=True).stop_ids == frozenset()
    assert make(ignore_eos=True, stop_token_ids=(9,)).stop_ids == frozenset({9})


def test_banned_are_the_stop_ids_only_with_min_tokens() -> None:
    assert make(stop_token_ids=(9,)).banned == frozenset()
    assert make(stop_token_ids=(9,), min_tokens=3).banned == frozenset({2, 9})
    assert make(ignore_eos=True, stop_token_ids=(9,), min_tokens=3).banned == frozenset({9})


def test_penalised_follows_the_params() -> None:
    assert not make().penalised
    assert make(presence_penalty=0.5).penalised
    assert make(frequency_penalty=-1.0).penalised
    assert make(repetition_penalty=1.2).penalised
