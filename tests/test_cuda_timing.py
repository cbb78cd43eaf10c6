"""The GPU timers' structure on CPU, against a fake device clock: each sample's events enclose
`inner` back-to-back calls (or one replay of a graph of them), and the result is per call."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch

from muxserve import cuda_timing

CALL_MS = 1.0  # device time of one call of the timed function


class Clock:
    """A device that runs each call for CALL_MS; events read its time. (Host time between the
    calls of one sample is hidden behind the queued work on a real device.)"""

    def __init__(self) -> None:
        self.device_ms = 0.0
        self.calls = 0
        self.capturing: FakeGraph | None = None
        self.records = 0

    def call(self) -> None:
        if self.capturing is not None:
            self.capturing.calls += 1
            return
        self.calls += 1
        self.device_ms += CALL_MS


@dataclass
class FakeGraph:
    clock: Clock | None = None
    calls: int = 0

    def replay(self) -> None:
        assert self.clock is not None
        self.clock.device_ms += self.calls * CALL_MS


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing
            self.at: float | None = None

        def record(self) -> None:
            c.records += 1
            self.at = c.device_ms

        def synchronize(self) -> None:
            pass

        def elapsed_time(self, end: Event) -> float:
            assert self.at is not None and end.at is not None
            return end.at - self.at

    def new_graph() -> FakeGraph:
        return FakeGraph(c)

    @contextlib.contextmanager
    def graph(g: FakeGraph):
        c.capturing = g
        yield
        c.capturing = None

    @dataclass
    class Stream:
        def wait_stream(self, other: object) -> None:
            pass

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", new_graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    return c


def test_cuda_time_launches_inner_calls_between_two_events(clock):
    seconds = cuda_timing.cuda_time(clock.call, repeat=5, warmup=2, inner=4)
    assert seconds == CALL_MS / 1e3
    assert clock.calls == 2 + 5 * 4
    assert clock.records == 2 * 5  # one pair of events per sample, not per call


def test_graph_time_replays_one_graph_of_inner_calls(clock):
    seconds = cuda_timing.graph_time(clock.call, repeat=3, warmup=2, inner=4)
    assert seconds == CALL_MS / 1e3
    assert clock.calls == 2  # the warm-up only: the timed calls are replays
    assert clock.records == 2 * 3
