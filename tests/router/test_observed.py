"""The router's view of the workload: rates and mean lengths over a sliding window, and drift."""

from __future__ import annotations

import pytest

from muxserve.router.observed import ObservedLoad, WorkloadWindow, drift


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_rates_and_lengths_over_the_window() -> None:
    clock = Clock()
    w = WorkloadWindow(10.0, clock)
    assert w.snapshot(["a"]) == {"a": ObservedLoad(0.0, None, None, 0)}  # no time has passed
    for k in range(4):  # t = 100, 101, 102, 103
        w.arrived("a", 10 + k)
        clock.t += 1.0
    w.finished("a", 7)
    w.arrived("b", 50)
    clock.t = 104.0
    # 4 s since the window began filling: a's 4 requests in 4 s, b's one in 4 s
    assert w.snapshot(["a", "c"]) == {
        "a": ObservedLoad(1.0, 11.5, 7.0, 4),
        "c": ObservedLoad(0.0, None, None, 0),
        "b": ObservedLoad(0.25, 50.0, None, 1),
    }
    clock.t = 111.5  # the window is (101.5, 111.5]: a's arrivals at 102 and 103 are left
    assert w.snapshot(["a"])["a"] == ObservedLoad(0.2, 12.5, 7.0, 2)
    clock.t = 114.0  # all of a's gone; the finish at 104 too
    assert w.snapshot(["a"])["a"] == ObservedLoad(0.0, None, None, 0)
    w.arrived("a", 3)
    w.reset()
    clock.t = 115.0
    assert w.snapshot([]) == {}


def test_bad_window() -> None:
    with pytest.raises(ValueError, match="must be positive, got 0 s"):
        WorkloadWindow(0.0)


def test_drift_is_the_largest_relative_change_against_a_floor() -> None:
    planned = {"a": 4.0, "b": 0.01, "c": 1.0}
    assert drift(planned, {"a": 5.0, "b": 0.05, "c": 1.0}, floor=0.5) == pytest.approx(0.25)
    # b's 0.01 -> 0.05 is +400% of its rate, but only 8% of the floor
    assert drift(planned, {"a": 4.0, "b": 0.05, "c": 1.0}, floor=0.5) == pytest.approx(0.08)
    assert drift(planned, {"a": 4.0, "b": 0.01, "c": 0.0}, floor=0.5) == pytest.approx(1.0)
    assert drift({}, {"new": 2.0}, floor=0.5) == pytest.approx(4.0)  # a model never planned for
    assert drift({}, {}, floor=0.5) == 0.0
    with pytest.raises(ValueError, match="floor must be positive"):
        drift(planned, planned, floor=0.0)


def test_memory_is_bounded_by_the_window_without_snapshots() -> None:
    clock = Clock()
    w = WorkloadWindow(2.0, clock)
    for _ in range(1000):
        w.arrived("a", 1)
        w.finished("a", 1)
        clock.t += 0.5
    # each append drops what left the window: 4 events of each kind are held (no public seam
    # says how many, hence the private look), the last at 599.5
    assert (len(w._arrivals["a"]), len(w._finishes["a"])) == (4, 4)
    assert w.snapshot(["a"])["a"] == ObservedLoad(1.5, 1.0, 1.0, 3)  # (598, 600]: 3 of them
