"""Workload generation: seeded, power-law popularity, burstiness, staggered ramps, lengths."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from muxserve.bench.trace import read_trace, write_trace
from muxserve.bench.workload import LengthDist, WorkloadSpec, generate, load_tokenizer

MODELS = ("a", "b", "c")


def spec(**kw: object) -> WorkloadSpec:
    base: dict[str, object] = {"models": MODELS, "rate": 20.0, "duration_s": 100.0}
    return WorkloadSpec(**{**base, **kw})  # type: ignore[arg-type]


def times(entries: list, model: str) -> np.ndarray:
    return np.array([e.arrival_s for e in entries if e.model == model])


def test_same_seed_same_trace_and_models_independent() -> None:
    a, _ = generate(spec(seed=3))
    assert a == generate(spec(seed=3))[0]
    assert a != generate(spec(seed=4))[0]
    # adding a model leaves the requests of the others as they were (rates aside)
    two, _ = generate(spec(models=("a", "b"), alpha=0.0, rate=10.0))
    three, _ = generate(spec(alpha=0.0, rate=15.0))
    assert [e for e in two if e.model == "a"] == [e for e in three if e.model == "a"]


def test_power_law_popularity() -> None:
    s = spec(alpha=1.0, rate=30.0, duration_s=200.0)
    assert s.model_rates() == pytest.approx([30 * 6 / 11, 30 * 3 / 11, 30 * 2 / 11])
    counts = Counter(e.model for e in generate(s)[0])
    for name, rate in zip(MODELS, s.model_rates(), strict=True):
        assert counts[name] == pytest.approx(rate * 200, rel=0.1)


@pytest.mark.parametrize("cv", [1.0, 3.0])
def test_burstiness_is_the_interarrival_cv(cv: float) -> None:
    t = times(generate(spec(models=("a",), rate=50.0, cv=cv))[0], "a")
    gaps = np.diff(t)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.15)
    assert len(t) == pytest.approx(5000, rel=0.15)


def test_staggered_ramps_peak_in_turn() -> None:
    s = spec(alpha=0.0, ramp="staggered", ramp_floor=0.05, rate=30.0)
    entries, meta = generate(s)
    hists = [np.histogram(times(entries, m), bins=3, range=(0, 100))[0] for m in MODELS]
    peaks = [int(np.argmax(h)) for h in hists]
    assert peaks == [0, 1, 2]  # model i peaks at (i + 0.5) / 3 of the duration
    assert all(h.max() > 3 * h.min() for h in hists)
    for m in MODELS:  # the mean rate is the power law's whatever the ramp
        assert len(times(entries, m)) == pytest.approx(1000, rel=0.15)
    assert meta["nominal_duration_s"] == 100.0 and meta["ramp"] == "staggered"


def test_ramp_shape_has_mean_one_and_the_floor() -> None:
    s = spec(ramp="staggered", ramp_floor=0.2, ramp_width=0.4, ramp_cycles=2)
    t = np.linspace(0, 100, 100001)
    for i in range(3):
        shape = s.shape(i, t)
        assert shape.mean() == pytest.approx(1.0, rel=1e-3)
        assert shape.min() / shape.max() == pytest.approx(0.2, rel=1e-3)


def test_lengths() -> None:
    rng = np.random.default_rng(0)
    assert set(LengthDist.parse("fixed:7").sample(rng, 100)) == {7}
    u = LengthDist.parse("uniform:3:5").sample(rng, 1000)
    assert set(u) == {3, 4, 5}
    chat = LengthDist.parse("chat:100:100000").sample(rng, 100000)
    assert chat.mean() == pytest.approx(100, rel=0.05)
    assert np.percentile(chat, 99) > 5 * np.median(chat)  # long-tailed
    assert LengthDist.parse("chat:50").high == 400
    for bad in ("fixed", "uniform:5:3", "chat:0", "normal:5", "fixed:x"):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)


def test_max_total_len_caps_every_request() -> None:
    s = spec(
        prompt_len=LengthDist.parse("chat:200"),
        output_len=LengthDist.parse("fixed:300"),
        max_total_len=256,
    )
    entries, _ = generate(s)
    assert max(e.prompt_len + e.max_tokens for e in entries) <= 256
    assert min(min(e.prompt_len, e.max_tokens) for e in entries) >= 1


def test_exact_prompt_lengths_with_a_tokenizer(demo_models: dict[str, Path]) -> None:
    tok = load_tokenizer(demo_models["llama-demo"])
    entries, meta = generate(
        spec(rate=1.0, duration_s=20.0, prompt_len=LengthDist.parse("uniform:5:60")), tok
    )
    assert meta["tokenizer"] is True
    for e in entries:
        assert len(tok.encode(e.prompt, add_special_tokens=False).ids) == pytest.approx(
            e.prompt_len, abs=1
        )


def test_trace_roundtrip_and_rescaling(tmp_path: Path) -> None:
    entries, meta = generate(spec(rate=2.0, duration_s=10.0))
    write_trace(tmp_path / "t.jsonl", entries, meta)
    trace = read_trace(tmp_path / "t.jsonl")
    assert list(trace.entries) == entries and trace.meta["seed"] == 0
    assert trace.duration_s == 10.0 and trace.rate == len(entries) / 10.0
    fast = trace.at_rate(2 * trace.rate)
    assert fast.duration_s == pytest.approx(5.0)
    assert [e.arrival_s for e in fast.entries] == pytest.approx([e.arrival_s / 2 for e in entries])
    (tmp_path / "bad.jsonl").write_text('{"model": "a"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        read_trace(tmp_path / "bad.jsonl")


def phase_counts(entries: list, models: tuple[str, ...], phases: int, span: float) -> list:
    width = span / phases
    return [
        [
            sum(1 for e in entries if e.model == m and k * width <= e.arrival_s < (k + 1) * width)
            for m in models
        ]
        for k in range(phases)
    ]


def test_shifting_popularity_rotates_the_hot_model() -> None:
    models = ("a", "b", "c", "d")
    s = spec(models=models, rate=10.0, duration_s=40.0, popularity="shifting", shift_phases=4)
    assert s.rank_rates() == pytest.approx([4.8, 2.4, 1.6, 1.2])
    assert [s.ranks(k) for k in range(4)] == [
        [0, 1, 2, 3],
        [1, 2, 3, 0],
        [2, 3, 0, 1],
        [3, 0, 1, 2],
    ]
    assert s.model_rates() == pytest.approx([2.5, 2.5, 2.5, 2.5])  # whole rotations: all equal
    t = np.array([0.0, 9.9, 10.0, 39.9, 40.0])
    assert list(s.intensity(3, t)) == pytest.approx([1.2, 1.2, 4.8, 1.6, 1.6])
    entries, meta = generate(s)
    assert len(entries) == 412 and meta["popularity"] == "shifting"
    counts = phase_counts(entries, models, 4, 40.0)
    assert counts == [[40, 23, 20, 10], [30, 13, 12, 49], [10, 15, 68, 26], [10, 43, 26, 17]]
    assert [int(np.argmax(c)) for c in counts] == [0, 3, 2, 1]  # the hot model moves each phase


def test_long_tail_is_zipf_over_shuffled_models() -> None:
    models = tuple(f"m{i}" for i in range(12))
    s = spec(models=models, rate=12.0, duration_s=50.0, popularity="longtail", alpha=1.2, seed=1)
    assert s.ranks() == [10, 2, 6, 11, 1, 4, 9, 5, 0, 7, 8, 3]
    by_rank = s.rank_rates()
    assert s.model_rates() == pytest.approx([by_rank[r] for r in s.ranks()])
    assert sum(s.model_rates()) == pytest.approx(12.0)
    entries, _ = generate(s)
    counts = Counter(e.model for e in entries)
    assert len(entries) == 579
    assert [counts[m] for m in models] == [12, 66, 21, 12, 91, 32, 10, 28, 214, 25, 15, 53]
    # the most popular model (rank 0: m8) carries over a third; seven of twelve get < 5% each
    assert counts["m8"] / len(entries) > 1 / 3
    assert sum(1 for m in models if counts[m] < 0.05 * len(entries)) == 7
    assert spec(models=models, popularity="longtail", seed=2).ranks() != s.ranks()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"popularity": "shifting", "ramp": "staggered"}, "sets the rates over time"),
        ({"shift_phases": 0}, "shift_phases must be at least 1"),
        ({"shift_step": -1}, "shift_step at least 0"),
    ],
)
def test_bad_popularity_options(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec(**kw)
