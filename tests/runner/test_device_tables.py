"""DeviceTables on the CPU device: every gather equals `pad_tables` of the host's tables."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from muxserve.runner.batch_layout import pad_tables
from muxserve.runner.cuda_graphs import GraphKey, pad_decode_inputs
from muxserve.runner.device_tables import DeviceTables
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import SeqWork

CPU = torch.device("cpu")
LAYERS, HEADS = 2, 3


def table(rows: int, base: int) -> np.ndarray:
    """(rows, LAYERS, HEADS) int32 block ids, all distinct and non-zero, from `base`."""
    n = rows * LAYERS * HEADS
    return np.arange(base, base + n, dtype=np.int32).reshape(rows, LAYERS, HEADS)


def seq(rid: str, t: np.ndarray) -> SeqWork:
    return SeqWork(rid, (1,), 0, t, True, SamplingParams(), 0, 0)


def check(store: DeviceTables, seqs: Sequence[SeqWork], fresh: Sequence[str] = ()) -> None:
    """One job: the store's padded table equals the host's, exactly."""
    slots = store.update(seqs, fresh)
    width = max(s.block_table.shape[0] for s in seqs)
    got = store.gather(slots, width)
    want = pad_tables([s.block_table for s in seqs])
    assert got.dtype == torch.int64 and got.is_contiguous()
    np.testing.assert_array_equal(got.numpy(), want)


def test_appends_then_fresh_release_and_reuse() -> None:
    store = DeviceTables(CPU, LAYERS, HEADS, max_rows=8, slots=4)
    a, b = table(1, 1), table(3, 100)
    check(store, [seq("a", a), seq("b", b)])
    assert len(store) == 2
    a = np.concatenate([a, table(1, 50)])  # "a" crosses a block boundary
    check(store, [seq("a", a), seq("b", b)])
    check(store, [seq("b", b), seq("a", a)])  # order of the batch is free
    # "b" is re-admitted after a preemption with a shorter, different table: its old rows 1..2
    # must read 0 again, as pad_tables pads
    b2 = table(1, 300)
    check(store, [seq("a", a), seq("b", b2)], fresh=["b"])
    # "a" finishes; "c" takes its slot, shorter than what the slot held
    store.release(["a"])
    store.release(["a"])  # a second release is harmless
    store.release(["never-seen"])
    assert len(store) == 1
    check(store, [seq("c", table(1, 400)), seq("b", b2)])
    assert len(store) == 2


def test_a_shorter_table_not_named_fresh_is_refused_and_changes_nothing() -> None:
    store = DeviceTables(CPU, LAYERS, HEADS, max_rows=8, slots=4)
    check(store, [seq("a", table(3, 1))])
    with pytest.raises(ValueError, match="a: its block table shrank from 3 to 2 rows"):
        store.update([seq("b", table(1, 9)), seq("a", table(2, 500))])
    assert len(store) == 1  # "b" got no slot
    check(store, [seq("a", table(3, 1))])  # what it held is still there
    check(store, [seq("a", table(2, 600))], fresh=["a", "not-in-this-job"])


def test_grows_past_the_initial_slots_and_rows() -> None:
    store = DeviceTables(CPU, LAYERS, HEADS, max_rows=2, slots=2)  # one usable slot
    seqs = [seq(f"r{i}", table(1 + i % 3, 1000 * (i + 1))) for i in range(9)]
    check(store, seqs)
    assert store.tables.shape[:2] == (16, 4) and len(store) == 9  # rows double: 3 > 2
    longer = seq("r0", np.concatenate([seqs[0].block_table, table(8, 99_000)]))  # 9 rows
    check(store, [longer, *seqs[1:]])
    assert store.tables.shape[1] == 9  # more than double: as many as the table needs
    longest = seq("r1", np.concatenate([seqs[1].block_table, table(8, 88_000)]))  # 10 rows
    check(store, [longer, longest, *seqs[2:]])
    assert store.tables.shape[1] == 18


def test_padded_to_a_graph_batch_matches_pad_decode_inputs() -> None:
    """The graph replay's static table: the batch, then padding rows (slot 0) of zeros."""
    store = DeviceTables(CPU, LAYERS, HEADS, max_rows=8, slots=4)
    seqs = [seq("a", table(2, 1)), seq("b", table(3, 100))]
    key, width = GraphKey(batch=4, context=256), 6
    out = torch.full((4, width, LAYERS, HEADS), 7, dtype=torch.int64)  # a previous replay's
    store.gather(store.update(seqs, pad_to=key.batch), width, out=out)
    want = pad_decode_inputs(seqs, key, width, LAYERS, HEADS).block_tables
    np.testing.assert_array_equal(out.numpy(), want)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="max_rows >= 1"):
        DeviceTables(CPU, LAYERS, HEADS, max_rows=0)
    store = DeviceTables(CPU, LAYERS, HEADS, max_rows=4)
    with pytest.raises(ValueError, match="batch of 2 sequences to 1"):
        store.update([seq("a", table(1, 1)), seq("b", table(1, 9))], pad_to=1)
    assert len(store) == 0  # refused before anything changed
