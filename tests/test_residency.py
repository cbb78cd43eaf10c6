"""The residency policy alone (torch-free): decayed demand, minimum residency, eviction order."""

from __future__ import annotations

import math

import pytest

from muxserve.residency import ResidencyPolicy, ResidencySettings


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def policy(clock: Clock, **settings: float) -> ResidencyPolicy:
    s = ResidencySettings(**{"half_life_s": 10.0, "min_residency_s": 5.0, **settings})
    return ResidencyPolicy({"a": 1.0, "b": 0.5, "c": 0.0}, s, clock)


def test_rate_starts_at_the_prior_and_halves_per_half_life():
    clock = Clock()
    p = policy(clock)
    assert p.rate("a") == pytest.approx(1.0)
    clock.now = 10.0
    assert p.rate("a") == pytest.approx(0.5)
    p.on_request("c")
    assert p.rate("c") == pytest.approx(math.log(2) / 10.0)


def test_eviction_order_is_by_value_then_name_and_skips_busy_and_young():
    clock = Clock()
    p = policy(clock)
    assert p.evictable(busy=()) == []  # all younger than min_residency_s
    clock.now = 5.0
    assert p.evictable(busy=()) == ["c", "b", "a"]
    assert p.evictable(busy={"c"}) == ["b", "a"]
    p.on_asleep("b")
    assert p.evictable(busy=()) == ["c", "a"]
    p.on_awake("b")  # its residency starts again
    assert p.evictable(busy=()) == ["c", "a"]
    clock.now = 10.0
    assert p.evictable(busy=()) == ["c", "b", "a"]


def test_make_room_takes_the_fewest_least_valuable():
    clock = Clock()
    p = policy(clock)
    clock.now = 100.0
    held = {"a": 40, "b": 30, "c": 20}
    assert p.make_room(need=10, free=10, held=held, busy=()) == []
    assert p.make_room(need=25, free=10, held=held, busy=()) == ["c"]
    assert p.make_room(need=55, free=10, held=held, busy=()) == ["c", "b"]
    assert p.make_room(need=55, free=10, held=held, busy={"b"}) == ["c", "a"]
    assert p.make_room(need=200, free=10, held=held, busy=()) is None
    assert p.make_room(need=25, free=10, held=held, busy={"a", "b", "c"}) is None


def test_two_busy_models_do_not_thrash():
    """A model woken to make room cannot be evicted again before its minimum residency."""
    clock = Clock()
    p = ResidencyPolicy({"x": 1.0, "y": 1.0}, ResidencySettings(10.0, 5.0), clock, awake={"x"})
    clock.now = 6.0
    assert p.make_room(10, 0, {"x": 10}, busy=()) == ["x"]  # y wakes, x sleeps
    p.on_asleep("x")
    p.on_awake("y")
    clock.now = 7.0
    assert p.make_room(10, 0, {"y": 10}, busy=()) is None  # x must wait for y's residency
    assert p.next_eviction_in(busy=()) == pytest.approx(4.0)
    clock.now = 11.0
    assert p.make_room(10, 0, {"y": 10}, busy=()) == ["y"]


def test_idle_models_sleep_after_idle_sleep_s_only_when_set():
    clock = Clock()
    assert policy(clock).idle_too_long(busy=()) == []
    p = policy(clock, idle_sleep_s=20.0)
    clock.now = 15.0
    p.on_request("a")
    clock.now = 25.0
    assert p.idle_too_long(busy=()) == ["c", "b"]
    assert p.idle_too_long(busy={"b"}) == ["c"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"half_life_s": 0.0}, "half_life_s"),
        ({"min_residency_s": -1.0}, "min_residency_s"),
        ({"idle_sleep_s": 0.0}, "idle_sleep_s"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResidencySettings(**kwargs)


def test_awake_models_must_be_listed():
    with pytest.raises(ValueError, match="not listed"):
        ResidencyPolicy({"a": 1.0}, awake={"a", "z"})
