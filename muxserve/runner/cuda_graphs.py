"""CUDA graphs for decode steps: one graph per (batch bucket, context bucket), captured at start.

A decode step of a small batch is bound by kernel launches, not by the GPU: replaying a graph
launches the whole forward at once. A graph bakes in every tensor address and shape, so each
one owns static inputs (token ids, cos/sin, the decode `BatchLayout`) padded to its bucket; a
job's inputs are copied into them and the graph replays. Correct by construction:

- the padded rows are inert: position -1 (the write kernel skips them) and context 0 (the
  decode kernel writes zeros for them), so a graph never touches a block the job does not own;
- the static block table is as wide as the context bucket, and the decode launch is split for
  the bucket's context, so any job whose longest context fits the bucket fits the graph;
- nothing in the captured region syncs with the host: RoPE's cos/sin (whose module reads the
  longest position on the host) are computed before the replay and copied in;
- the graphs of one runner share a memory pool, which is safe because one decode job per model
  is in flight at a time and each output (the logits) is consumed on the same stream before
  the next replay.

Capture: the executors call `warm_up()` at start-up and after a model wakes (its weights, and
so its graphs, are new), on the stream the model's decode jobs will
run on (a partition's: kernels captured on torch's side stream would replay outside the green
context's SMs). It captures every batch bucket for contexts up to STARTUP_MAX_CONTEXT; after it,
a bucket it did not capture runs eagerly, because a capture mid-serving synchronises the whole
device and empties the allocator's cache, stalling every other model's jobs. A runner nobody
warmed up (scripts, tests) captures each bucket on first use. A capture that fails is
remembered: its bucket runs eagerly from then on, said once in the log, and is never retried.

Off with `MUXSERVE_CUDA_GRAPHS=0`; jobs that fit no bucket (too many sequences, a context past
the largest bucket, a static table over `max_table_bytes`) run eagerly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from muxserve.models.causal_lm import Attention, CausalLM
from muxserve.runner.attention import BatchLayout
from muxserve.runner.device_tables import DeviceTables
from muxserve.runner.kernels import ops
from muxserve.scheduler.job import SeqWork

log = logging.getLogger(__name__)

GRAPHS_ENV = "MUXSERVE_CUDA_GRAPHS"  # "1" / "on": capture; off by default until GPU-validated
MIN_CONTEXT_BUCKET = 256
MAX_TABLE_BYTES = 64 << 20  # largest static block table a graph may own
# Contexts whose buckets `warm_up` captures: past 4k tokens a decode step is long enough that
# launch overhead is a small part of it, and every graph keeps its own (batch, vocab) logits.
STARTUP_MAX_CONTEXT = 4096


def graphs_enabled() -> bool:
    return os.environ.get(GRAPHS_ENV, "0").strip().lower() in ("1", "on", "true", "yes")


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes that get a graph: 1, 2, 4, 8, then every 8 to 64, then every 32.

    Fine steps where a decode step is cheap (padding a batch of 9 to 16 would cost more than a
    graph saves), coarse ones where the step is long and padding is a small part of it.
    """
    sizes = [1, 2, 4, *range(8, 65, 8), *range(96, max(max_batch, 1) + 32, 32)]
    out = sorted({s for s in sizes if s < max_batch} | {max_batch})
    return tuple(out)


def bucket_for(n: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket that holds `n`, or None when none does."""
    return next((b for b in buckets if b >= n), None)


def context_bucket(max_context: int, limit: int) -> int | None:
    """The power of two (at least MIN_CONTEXT_BUCKET) that covers `max_context`, capped at
    `limit` (the model's longest context); None when the context exceeds the limit."""
    if max_context > limit:
        return None
    bucket = MIN_CONTEXT_BUCKET
    while bucket < max_context:
        bucket *= 2
    return min(bucket, limit)


def context_buckets(limit: int) -> tuple[int, ...]:
    """Every context bucket up to `limit` (the model's longest context): the values
    `context_bucket` takes."""
    out = [MIN_CONTEXT_BUCKET]
    while out[-1] < limit:
        out.append(out[-1] * 2)
    return tuple(sorted({min(b, limit) for b in out}))


class GraphKey(NamedTuple):
    batch: int  # sequences, padded to a bucket
    context: int  # longest context the graph serves, in tokens


@dataclass(frozen=True)
class GraphPlanner:
    """Which graph (if any) a decode job replays: pure bookkeeping, no device."""

    buckets: tuple[int, ...]
    max_context: int  # the model's longest context
    tokens_per_block: int
    num_layers: int
    num_kv_heads: int
    max_table_bytes: int = MAX_TABLE_BYTES

    def table_width(self, context: int) -> int:
        """Logical blocks of the static block table of a graph for `context` tokens."""
        return -(-context // self.tokens_per_block)

    def table_bytes(self, key: GraphKey) -> int:
        width = self.table_width(key.context)
        return key.batch * width * self.num_layers * self.num_kv_heads * 8

    def key_for(self, seqs: Sequence[SeqWork]) -> GraphKey | None:
        """The graph for a batch of sequences, or None: not a decode batch, or it fits none."""
        if not seqs or any(len(s.token_ids) != 1 for s in seqs):
            return None
        batch = bucket_for(len(seqs), self.buckets)
        context = context_bucket(max(s.end_pos for s in seqs), self.max_context)
        if batch is None or context is None:
            return None
        key = GraphKey(batch, context)
        return key if self.table_bytes(key) <= self.max_table_bytes else None

    def startup_keys(self, max_context: int = STARTUP_MAX_CONTEXT) -> list[GraphKey]:
        """The graphs `warm_up` captures: every batch bucket for every context bucket up to
        `max_context`, whose static table fits; shortest contexts, then smallest batches first."""
        contexts = [c for c in context_buckets(self.max_context) if c <= max_context]
        keys = [GraphKey(b, c) for c in contexts for b in self.buckets]
        return [k for k in keys if self.table_bytes(k) <= self.max_table_bytes]


@dataclass
class DecodeInputs:
    """A decode batch's inputs padded to a graph's shapes (host arrays, int64)."""

    input_ids: np.ndarray  # (batch,) padding: 0
    positions: np.ndarray  # (batch,) for RoPE; padding: 0 (any valid position)
    pos_of_token: np.ndarray  # (batch,) where the K/V go; padding: -1, nothing written
    ctx_lens: np.ndarray  # (batch,) padding: 0, output zeros
    # (batch, width, layers, kv_heads) padding: 0, never read; None: the device has them
    block_tables: np.ndarray | None


def pad_decode_inputs(
    seqs: Sequence[SeqWork],
    key: GraphKey,
    width: int,
    num_layers: int,
    num_kv_heads: int,
    with_tables: bool = True,
) -> DecodeInputs:
    """The static inputs of graph `key` for these sequences: row i is seqs[i], then padding.
    `with_tables` False: not the block tables (a runner with `DeviceTables` gathers them)."""
    n = len(seqs)
    ids = np.zeros(key.batch, dtype=np.int64)
    pos = np.full(key.batch, -1, dtype=np.int64)
    ctx = np.zeros(key.batch, dtype=np.int64)
    tables = None
    if with_tables:
        tables = np.zeros((key.batch, width, num_layers, num_kv_heads), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i] = s.token_ids[0]
        pos[i] = s.start_pos
        ctx[i] = s.end_pos
        if tables is not None:
            tables[i, : s.block_table.shape[0]] = s.block_table
    positions = pos.copy()
    positions[n:] = 0
    return DecodeInputs(ids, positions, pos, ctx, tables)


def decode_logits(
    model: CausalLM,
    input_ids: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attention: Attention,
) -> torch.Tensor:
    """`model(...)` then `compute_logits` for every row, with cos/sin given, not computed.

    The body that is captured: the model's forward without its RoPE call (which syncs with the
    host); tests/runner keep the two equal.
    """
    hidden = model.forward_rotated(input_ids, cos, sin, attention)  # (B, hidden)
    return model.compute_logits(hidden)  # (B, vocab) float32


@dataclass
class _Graph:
    """A captured decode step and the static tensors it reads and writes."""

    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor  # (batch,)
    positions: torch.Tensor  # (batch,)
    cos: torch.Tensor  # (batch, head_dim)
    sin: torch.Tensor
    batch: BatchLayout  # its tensors are the graph's inputs
    logits: torch.Tensor  # (batch, vocab): the output
    attention: Attention  # keeps the decode workspace alive
    stream: int  # the stream it was captured on (`cuda_stream`): where its replays belong


class DecodeGraphs:
    """One model's decode graphs over its view of the pool (CUDA and the kernels only)."""

    def __init__(
        self,
        model: CausalLM,
        cache: torch.Tensor,
        planner: GraphPlanner,
        sliding_windows: Sequence[int | None],
    ) -> None:
        self.model = model
        self.cache = cache
        self.planner = planner
        self.windows = sliding_windows
        self.device = cache.device
        self.dtype = next(model.parameters()).dtype
        self._graphs: dict[GraphKey, _Graph] = {}
        self._pool: torch.cuda._POOL_HANDLE | None = None  # made at the first capture
        self.failed: dict[GraphKey, str] = {}  # buckets whose capture failed, with the error
        self._lazy = True  # capture on first use, until `warm_up` has captured at start-up

    @classmethod
    def create(
        cls,
        model: CausalLM,
        cache: torch.Tensor,
        max_context: int,
        num_layers: int,
        num_kv_heads: int,
        sliding_windows: Sequence[int | None],
        max_batch: int = 256,
    ) -> DecodeGraphs | None:
        """Graphs for this model, or None: off, not CUDA, a model no graph can hold (soft-capped
        attention, routed experts: `graph_safe`), or no kernels for its pool view."""
        if not graphs_enabled() or cache.device.type != "cuda" or not model.graph_safe:
            return None
        if ops.kernels_for_cache(cache) is None:
            return None
        planner = GraphPlanner(
            batch_buckets(max_batch), max_context, cache.shape[2], num_layers, num_kv_heads
        )
        return cls(model, cache, planner, sliding_windows)

    @torch.inference_mode()
    def run(
        self,
        seqs: Sequence[SeqWork],
        tables: DeviceTables | None = None,
        fresh: Sequence[str] = (),
    ) -> torch.Tensor | None:
        """(len(seqs), vocab) float32 logits of one decode step, or None when no graph fits.

        `tables`: the runner's block tables on the device (`fresh` as in `Job.fresh`): the
        static table is gathered from them on the device, not padded on the host and copied."""
        key = self.planner.key_for(seqs)
        if key is None:
            return None
        entry = self._graphs.get(key)
        if entry is None:
            if not self._lazy or key in self.failed:
                return None  # eager: see the module docstring
            entry = self._try_capture(key)
            if entry is None:
                return None
        p = self.planner
        width = p.table_width(key.context)
        inputs = pad_decode_inputs(
            seqs, key, width, p.num_layers, p.num_kv_heads, with_tables=tables is None
        )
        b = entry.batch
        copies = [
            (entry.input_ids, inputs.input_ids),
            (entry.positions, inputs.positions),
            (b.pos_of_token, inputs.pos_of_token),
            (b.ctx_lens, inputs.ctx_lens),
        ]
        if inputs.block_tables is not None:
            copies.append((b.block_tables, inputs.block_tables))
        else:
            assert tables is not None
            slots = tables.update(seqs, fresh, pad_to=key.batch)  # padding rows: slot 0
            tables.gather(slots, width, out=b.block_tables)  # device to device
        for dst, src in copies:
            dst.copy_(torch.from_numpy(src), non_blocking=True)
        cos, sin = self.model.rotary(entry.positions, self.dtype)
        entry.cos.copy_(cos)
        entry.sin.copy_(sin)
        entry.graph.replay()
        return entry.logits[: len(seqs)]

    def _capture(self, key: GraphKey) -> _Graph:
        p = self.planner
        dev = self.device
        zeros = torch.zeros(key.batch, dtype=torch.int64, device=dev)
        batch = BatchLayout(
            seq_of_token=torch.arange(key.batch, device=dev),
            pos_of_token=torch.full((key.batch,), -1, dtype=torch.int64, device=dev),
            row_of_token=zeros.clone(),
            q_lens=torch.ones(key.batch, dtype=torch.int64, device=dev),
            ctx_lens=zeros.clone(),
            block_tables=torch.zeros(
                key.batch,
                p.table_width(key.context),
                p.num_layers,
                p.num_kv_heads,
                dtype=torch.int64,
                device=dev,
            ),
        )
        input_ids, positions = zeros.clone(), zeros.clone()
        width = self.model.rotary(positions, self.dtype)[0].shape[-1]  # one table or two
        cos = torch.zeros(key.batch, width, dtype=self.dtype, device=dev)
        sin = torch.zeros_like(cos)
        attention = ops.make_attention(self.cache, batch, self.windows, 1, key.context)
        # Capture on the stream the replays run on: a partition's stream is in its green
        # context, and kernels captured elsewhere would replay outside its SMs. The default
        # stream cannot capture: a side stream then (an MPS worker's quota is per process).
        current = torch.cuda.current_stream(dev)
        stream = current if current != torch.cuda.default_stream(dev) else torch.cuda.Stream(dev)
        stream.wait_stream(current)
        # warm up on that stream (cuBLAS picks its kernels and workspaces for those SMs), then
        # capture; all rows are padding, so neither touches the pool
        with torch.cuda.stream(stream):
            for _ in range(2):
                decode_logits(self.model, input_ids, cos, sin, attention)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: other models' jobs keep running on their streams during a capture
        with torch.cuda.graph(
            graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"
        ):
            logits = decode_logits(self.model, input_ids, cos, sin, attention)
        current.wait_stream(stream)
        log.info("captured a decode graph for %s", key)
        handle = int(stream.cuda_stream)
        entry = _Graph(graph, input_ids, positions, cos, sin, batch, logits, attention, handle)
        self._graphs[key] = entry
        return entry

    def _try_capture(self, key: GraphKey) -> _Graph | None:
        """`_capture`, or None after remembering and logging (once: it is never retried) why
        it failed; the bucket then runs eagerly."""
        try:
            return self._capture(key)
        except Exception as e:  # out of memory, a kernel that cannot be captured, ...
            self.failed[key] = f"{type(e).__name__}: {e}"
            log.warning(
                "capture of the decode graph %s failed, its jobs run eagerly: %s",
                key,
                self.failed[key],
            )
            return None

    def warm_up(self, max_context: int = STARTUP_MAX_CONTEXT) -> list[GraphKey]:
        """Capture the start-up buckets now, on the current stream (the one this model's decode
        jobs will run on); from then on, no capture happens mid-serving. Returns what was
        captured (a failed capture is remembered in `failed`)."""
        for key in self.planner.startup_keys(max_context):
            if key not in self._graphs and key not in self.failed:
                self._try_capture(key)
        self._lazy = False
        log.info(
            "decode graphs: %d captured, %d failed at start-up", len(self._graphs), len(self.failed)
        )
        return self.captured

    @property
    def captured(self) -> list[GraphKey]:
        return sorted(self._graphs)
