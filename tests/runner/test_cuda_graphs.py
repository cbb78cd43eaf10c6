"""Decode graphs' capture bookkeeping on CPU, with torch.cuda faked where a capture would run:
which buckets are captured at start-up, that a failed capture is remembered (its bucket runs
eagerly, logged once, never retried), that nothing is captured mid-serving after start-up,
and that a capture runs on the stream the replays will run on (a partition's)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from muxserve.runner import cuda_graphs
from muxserve.runner.cuda_graphs import (
    DecodeGraphs,
    GraphKey,
    GraphPlanner,
    _Graph,
    context_bucket,
    context_buckets,
)
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import SeqWork

VOCAB = 11
HEAD_DIM = 8


# ---- which buckets ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("limit", "buckets"),
    [
        (4096, (256, 512, 1024, 2048, 4096)),
        (1000, (256, 512, 1000)),
        (100, (100,)),
        (256, (256,)),
    ],
)
def test_context_buckets(limit, buckets):
    assert context_buckets(limit) == buckets
    assert {context_bucket(n, limit) for n in range(1, limit + 1)} == set(buckets)


def planner(max_context: int = 8192, table_cap: int = 1 << 30) -> GraphPlanner:
    return GraphPlanner((1, 2, 4), max_context, 16, 2, 2, table_cap)


def test_startup_keys_cover_contexts_up_to_the_limit():
    assert planner().startup_keys(1024) == [
        GraphKey(1, 256), GraphKey(2, 256), GraphKey(4, 256),
        GraphKey(1, 512), GraphKey(2, 512), GraphKey(4, 512),
        GraphKey(1, 1024), GraphKey(2, 1024), GraphKey(4, 1024),
    ]  # fmt: skip
    assert [k.context for k in planner(600).startup_keys()] == [256] * 3 + [512] * 3 + [600] * 3


def test_startup_keys_skip_tables_over_the_cap():
    # a graph's table: batch x ceil(context / 16) x 2 layers x 2 heads x 8 bytes
    p = planner(table_cap=4 * 32 * 2 * 2 * 8)  # batch 4 at 512 tokens fits exactly
    assert p.table_bytes(GraphKey(4, 512)) == p.max_table_bytes
    assert p.startup_keys(1024) == [
        GraphKey(1, 256), GraphKey(2, 256), GraphKey(4, 256),
        GraphKey(1, 512), GraphKey(2, 512), GraphKey(4, 512),
        GraphKey(1, 1024), GraphKey(2, 1024),
    ]  # fmt: skip


# ---- capture bookkeeping, with `_capture` replaced --------------------------------------
def fake_model() -> Any:
    """Just what DecodeGraphs touches outside the captured body: a dtype and RoPE."""

    def rotary(positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cos = positions[:, None].to(dtype).expand(-1, HEAD_DIM).clone()
        return cos, -cos

    weight = torch.zeros(1)
    return SimpleNamespace(
        parameters=lambda: iter([weight]),
        rotary=rotary,  # the model protocol's name for it ...
        model=SimpleNamespace(rotary_emb=rotary),  # ... and Llama's
        graph_safe=True,
    )


@dataclass
class FakeGraph:
    replays: int = 0

    def replay(self) -> None:
        self.replays += 1


def fake_entry(key: GraphKey) -> _Graph:
    zeros = torch.zeros(key.batch, dtype=torch.int64)
    batch = SimpleNamespace(
        pos_of_token=zeros.clone(),
        ctx_lens=zeros.clone(),
        block_tables=torch.zeros(key.batch, key.context // 16, 2, 2, dtype=torch.int64),
    )
    logits = torch.arange(key.batch * VOCAB, dtype=torch.float32).view(key.batch, VOCAB)
    cos = torch.zeros(key.batch, HEAD_DIM)
    return _Graph(
        FakeGraph(),  # type: ignore[arg-type]
        zeros.clone(),
        zeros.clone(),
        cos,
        cos.clone(),
        batch,  # type: ignore[arg-type]
        logits,
        None,  # type: ignore[arg-type]
        0,
    )


@dataclass
class Captures:
    """Stands in for `DecodeGraphs._capture`: fails for the keys in `failing`."""

    failing: set[GraphKey] = field(default_factory=set)
    calls: list[GraphKey] = field(default_factory=list)

    def __call__(self, graphs: DecodeGraphs, key: GraphKey) -> _Graph:
        self.calls.append(key)
        if key in self.failing:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        entry = fake_entry(key)
        graphs._graphs[key] = entry
        return entry


def make_graphs(monkeypatch: pytest.MonkeyPatch, captures: Captures) -> DecodeGraphs:
    cache = torch.zeros(64, 2, 16, HEAD_DIM)
    graphs = DecodeGraphs(fake_model(), cache, planner(max_context=512), (None, None))
    monkeypatch.setattr(graphs, "_capture", lambda key: captures(graphs, key))
    return graphs


def decode_seqs(n: int, context: int) -> list[SeqWork]:
    table = np.zeros((-(-context // 16), 2, 2), dtype=np.int64)
    greedy = SamplingParams(temperature=0.0)
    return [SeqWork(f"r{i}", (5 + i,), context - 1, table, True, greedy, 0, 0) for i in range(n)]


def test_warm_up_captures_the_startup_buckets_and_remembers_failures(monkeypatch, caplog):
    captures = Captures(failing={GraphKey(2, 512)})
    graphs = make_graphs(monkeypatch, captures)
    with caplog.at_level(logging.WARNING, cuda_graphs.log.name):
        captured = graphs.warm_up()
    startup = [GraphKey(b, c) for c in (256, 512) for b in (1, 2, 4)]
    assert captures.calls == startup
    assert captured == sorted(set(startup) - {GraphKey(2, 512)})
    error = "RuntimeError: CUDA error: operation not permitted when stream is capturing"
    assert graphs.failed == {GraphKey(2, 512): error}
    assert [r.getMessage() for r in caplog.records] == [
        f"capture of the decode graph GraphKey(batch=2, context=512) failed, its jobs run "
        f"eagerly: {error}"
    ]
    # the failed bucket runs eagerly and is never captured again; warm_up again tries nothing
    assert graphs.run(decode_seqs(2, 300)) is None
    graphs.warm_up()
    assert graphs.run(decode_seqs(2, 300)) is None
    assert captures.calls == startup
    assert len(caplog.records) == 1


def test_after_warm_up_nothing_is_captured_mid_serving(monkeypatch):
    captures = Captures()
    graphs = make_graphs(monkeypatch, captures)
    graphs.warm_up(max_context=256)
    assert graphs.captured == [GraphKey(1, 256), GraphKey(2, 256), GraphKey(4, 256)]
    assert graphs.run(decode_seqs(3, 400)) is None  # bucket (4, 512): eager, not captured now
    assert len(captures.calls) == 3
    logits = graphs.run(decode_seqs(3, 200))  # bucket (4, 256): replayed
    assert logits is not None
    entry = graphs._graphs[GraphKey(4, 256)]
    assert entry.graph.replays == 1
    assert torch.equal(logits, entry.logits[:3])
    assert entry.input_ids.tolist() == [5, 6, 7, 0]
    assert entry.positions.tolist() == [199, 199, 199, 0]
    assert entry.cos[:, 0].tolist() == [199.0, 199.0, 199.0, 0.0]


def test_without_warm_up_a_bucket_is_captured_on_first_use_once(monkeypatch, caplog):
    captures = Captures(failing={GraphKey(1, 256)})
    graphs = make_graphs(monkeypatch, captures)
    with caplog.at_level(logging.WARNING, cuda_graphs.log.name):
        assert graphs.run(decode_seqs(1, 10)) is None
        assert graphs.run(decode_seqs(1, 20)) is None
    assert graphs.run(decode_seqs(2, 10)) is not None
    assert graphs.run(decode_seqs(2, 30)) is not None
    assert captures.calls == [GraphKey(1, 256), GraphKey(2, 256)]
    assert len(caplog.records) == 1


# ---- the capture itself: which stream -----------------------------------------------------
@dataclass(eq=False)
class FakeStream:
    cuda_stream: int
    waited: list[int] = field(default_factory=list)

    def wait_stream(self, other: FakeStream) -> None:
        self.waited.append(other.cuda_stream)


class FakeCuda:
    """The torch.cuda calls `_capture` makes, recording on which stream work is issued."""

    def __init__(self, current: FakeStream, default: FakeStream) -> None:
        self.current, self.default = current, default
        self.stack = [current]
        self.side: list[FakeStream] = []
        self.bodies: list[tuple[str, int]] = []  # ("warm-up" | "capture", stream)
        self.graph_kwargs: dict[str, Any] = {}

    def current_stream(self, device: object = None) -> FakeStream:
        return self.stack[-1]

    def default_stream(self, device: object = None) -> FakeStream:
        return self.default

    def new_stream(self, device: object = None) -> FakeStream:
        self.side.append(FakeStream(100 + len(self.side)))
        return self.side[-1]

    @contextlib.contextmanager
    def stream(self, s: FakeStream):
        self.stack.append(s)
        yield
        self.stack.pop()

    @contextlib.contextmanager
    def graph(self, graph: object, **kwargs: Any):
        self.graph_kwargs = kwargs
        self.stack.append(kwargs["stream"])
        self.capturing = True
        yield
        self.capturing = False
        self.stack.pop()

    capturing = False

    def body(self, model, input_ids, cos, sin, attention) -> torch.Tensor:
        self.bodies.append(("capture" if self.capturing else "warm-up", self.stack[-1].cuda_stream))
        return torch.zeros(input_ids.shape[0], VOCAB)


def capture_with(monkeypatch: pytest.MonkeyPatch, fake: FakeCuda) -> _Graph:
    for name, value in (
        ("current_stream", fake.current_stream),
        ("default_stream", fake.default_stream),
        ("Stream", fake.new_stream),
        ("stream", fake.stream),
        ("graph", fake.graph),
        ("graph_pool_handle", lambda: ("pool", 1)),
        ("CUDAGraph", FakeGraph),
    ):
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(cuda_graphs, "decode_logits", fake.body)
    cache = torch.zeros(64, 2, 16, HEAD_DIM)
    graphs = DecodeGraphs(fake_model(), cache, planner(max_context=512), (None, None))
    return graphs._capture(GraphKey(2, 256))


def test_capture_runs_on_the_partition_stream(monkeypatch):
    partition = FakeStream(7)  # e.g. a green context's stream, current while the job launches
    fake = FakeCuda(partition, FakeStream(0))
    entry = capture_with(monkeypatch, fake)
    assert fake.bodies == [("warm-up", 7), ("warm-up", 7), ("capture", 7)]
    assert fake.side == []
    assert fake.graph_kwargs == {
        "pool": ("pool", 1),
        "stream": partition,
        "capture_error_mode": "thread_local",
    }
    assert entry.stream == 7


def test_capture_from_the_default_stream_uses_a_side_stream(monkeypatch):
    default = FakeStream(0)  # an MPS worker's jobs: its quota is per process
    fake = FakeCuda(default, default)
    entry = capture_with(monkeypatch, fake)
    assert fake.bodies == [("warm-up", 100), ("warm-up", 100), ("capture", 100)]
    assert fake.side[0].waited == [0]  # after what the default stream has queued
    assert default.waited == [100]  # and the default stream waits for the capture
    assert entry.stream == 100
