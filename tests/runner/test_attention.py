"""PagedAttention over the pool against dense causal attention over whole sequences."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from muxserve.kv.block_pool import BlockPool
from muxserve.kv.block_tables import BlockTables
from muxserve.kv.layout import KVLayout
from muxserve.models.dense_attention import DenseAttention
from muxserve.runner import attention as attention_module
from muxserve.runner import batch_layout
from muxserve.runner.attention import BatchLayout, PagedAttention
from muxserve.runner.kv_pool import KVPool
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import SeqWork

CPU = torch.device("cpu")
FP32_TOL = 1e-5
NUM_LAYERS = 2
TAIL_BYTES = 8  # each block has bytes past the model's tokens, which must stay unused

Chunk = tuple[str, int, int]  # (request id, start position, end position)

# Sequence lengths and the calls that feed them, several sequences packed per call: prefills
# from 0, decodes of 1 token, and a prefill (b) that continues from 5 cached tokens.
LENGTHS = {"a": 9, "b": 14, "c": 5, "d": 10}
CALLS: list[list[Chunk]] = [
    [("a", 0, 7), ("b", 0, 5), ("c", 0, 3)],
    [("a", 7, 8), ("b", 5, 13), ("c", 3, 4), ("d", 0, 9)],
    [("a", 8, 9), ("b", 13, 14), ("c", 4, 5), ("d", 9, 10)],
]


def seq_work(rid: str, start: int, end: int, table: np.ndarray) -> SeqWork:
    return SeqWork(
        request_id=rid,
        token_ids=(0,) * (end - start),
        start_pos=start,
        block_table=table,
        sample=True,
        params=SamplingParams(temperature=0.0),
        seed=0,
        step=0,
    )


def make_pool(layout: KVLayout, num_blocks: int, dtype: torch.dtype) -> tuple[KVPool, torch.Tensor]:
    pool = KVPool(num_blocks, layout.block_bytes, CPU)
    return pool, pool.view(layout, dtype)


def scattered_tables(layout: KVLayout, num_blocks: int, seed: int) -> BlockTables:
    """Block tables whose ids come out non-contiguous and shuffled.

    Every block is taken, then a shuffled two thirds are freed: the free list is then in that
    shuffled order, and the third still held is never written by the tests.
    """
    pool = BlockPool(num_blocks, {"m": num_blocks})
    ids = pool.allocate("m", num_blocks)
    freed = np.random.default_rng(seed).permutation(ids)[: num_blocks * 2 // 3]
    pool.free("m", freed)
    return BlockTables(pool, {"m": layout})


QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
MakeAttention = Callable[[torch.Tensor, list[SeqWork], Sequence[int | None]], PagedAttention]


def without_host(batch: BatchLayout) -> BatchLayout:
    """The same batch as the device knows it: padded tables, no host lengths."""
    return BatchLayout(
        seq_of_token=batch.seq_of_token,
        pos_of_token=batch.pos_of_token,
        row_of_token=batch.row_of_token,
        q_lens=batch.q_lens,
        ctx_lens=batch.ctx_lens,
        block_tables=batch.block_tables,
    )


# How PagedAttention reads the pool: in groups of decodes (the CPU default), every sequence
# alone, all decodes in one group, or the whole batch as one padded group (off the CPU).
PATHS: dict[str, MakeAttention] = {
    "groups": lambda cache, seqs, windows: PagedAttention(
        cache, BatchLayout.from_seqs(seqs, CPU), windows
    ),
    "per-sequence": lambda cache, seqs, windows: PagedAttention(
        cache, BatchLayout.from_seqs(seqs, CPU), windows, group_bytes=0
    ),
    "one-group": lambda cache, seqs, windows: PagedAttention(
        cache, BatchLayout.from_seqs(seqs, CPU), windows, group_bytes=1 << 40
    ),
    "padded": lambda cache, seqs, windows: PagedAttention(
        cache, without_host(BatchLayout.from_seqs(seqs, CPU)), windows
    ),
}


def random_qkv(
    n: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    gen: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> list[QKV]:
    """Per layer: q (n, heads, hd), k and v (n, kv_heads, hd)."""
    return [
        (
            torch.randn(n, heads, head_dim, generator=gen).to(dtype),
            torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype),
            torch.randn(n, kv_heads, head_dim, generator=gen).to(dtype),
        )
        for _ in range(NUM_LAYERS)
    ]


def dense_reference(
    qkv: list[QKV], windows: Sequence[int | None], softcap: float | None = None
) -> list[torch.Tensor]:
    """Per layer: (n, heads, hd) of one dense call over the whole sequence."""
    n = qkv[0][0].shape[0]
    dense = DenseAttention([n], windows, softcap)
    return [dense(layer, q, k, v) for layer, (q, k, v) in enumerate(qkv)]


def run_paged(
    cache: torch.Tensor,
    tables: BlockTables,
    calls: list[list[Chunk]],
    qkv: dict[str, list[QKV]],
    windows: Sequence[int | None],
    make: MakeAttention = PATHS["groups"],
) -> dict[str, list[list[torch.Tensor]]]:
    """Feed the calls in order; per request and layer, the output rows of each of its chunks."""
    outs: dict[str, list[list[torch.Tensor]]] = {
        rid: [[] for _ in range(NUM_LAYERS)] for rid in qkv
    }
    for call in calls:
        for rid, _, end in call:
            tables.cover("m", rid, end)  # grows as the sequence does, as the scheduler's would
        seqs = [seq_work(rid, start, end, tables.table(rid)) for rid, start, end in call]
        attention = make(cache, seqs, windows)
        lens = [end - start for _, start, end in call]
        for layer in range(NUM_LAYERS):
            q, k, v = (
                torch.cat([qkv[rid][layer][i][start:end] for rid, start, end in call])
                for i in range(3)
            )
            out = attention(layer, q, k, v)  # (T, heads, hd)
            assert out.shape == q.shape
            for (rid, _, _), rows in zip(call, out.split(lens), strict=True):
                outs[rid][layer].append(rows)
    return outs


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    [(8, 2, 16), (8, 2, 64), (4, 4, 16), (4, 4, 64)],
    ids=["gqa-16", "gqa-64", "mha-16", "mha-64"],
)
@pytest.mark.parametrize("tokens_per_block", [3, 5])
@pytest.mark.parametrize(
    "windows", [(None, None), (None, 3), (4, 1)], ids=["full", "window-3", "window-4-1"]
)
@pytest.mark.parametrize("path", list(PATHS))
def test_paged_matches_dense_over_chunked_packed_calls(
    heads: int,
    kv_heads: int,
    head_dim: int,
    tokens_per_block: int,
    windows: tuple[int | None, ...],
    path: str,
) -> None:
    block_bytes = 2 * head_dim * 4 * tokens_per_block + TAIL_BYTES
    layout = KVLayout(NUM_LAYERS, kv_heads, head_dim, 4, block_bytes)
    assert layout.tokens_per_block == tokens_per_block
    needed = sum(layout.physical_blocks_for(n) for n in LENGTHS.values())
    num_blocks = 3 * needed  # two thirds (2 * needed) are freed for the tables
    pool, cache = make_pool(layout, num_blocks, torch.float32)
    tables = scattered_tables(layout, num_blocks, seed=tokens_per_block)
    gen = torch.Generator().manual_seed(heads * 1000 + head_dim)
    qkv = {rid: random_qkv(n, heads, kv_heads, head_dim, gen) for rid, n in LENGTHS.items()}

    outs = run_paged(cache, tables, CALLS, qkv, windows, PATHS[path])

    for rid in LENGTHS:
        expected = dense_reference(qkv[rid], windows)
        for layer in range(NUM_LAYERS):
            got = torch.cat(outs[rid][layer])
            assert (got - expected[layer]).abs().max().item() < FP32_TOL, (rid, layer)

    # the ids really are scattered: not one sequence's table is a contiguous run
    used = np.concatenate([tables.table(rid).ravel() for rid in LENGTHS])
    assert used.size == needed == np.unique(used).size
    for rid in LENGTHS:
        flat = tables.table(rid).ravel()
        assert not np.array_equal(flat, np.arange(flat[0], flat[0] + flat.size))
    tables.pool.check_integrity()

    # every token's K/V sits where its table says, and nothing else of the pool was written
    written = torch.zeros(num_blocks, 2, tokens_per_block, dtype=torch.bool)
    for rid, n in LENGTHS.items():
        table = torch.from_numpy(tables.table(rid)).long()  # (nlb, layers, kv_heads)
        pos = torch.arange(n)
        off = (pos % tokens_per_block)[:, None].expand(-1, kv_heads)  # (n, kv_heads)
        for layer in range(NUM_LAYERS):
            _, k, v = qkv[rid][layer]
            ids = table[pos // tokens_per_block, layer]  # (n, kv_heads)
            assert torch.equal(cache[ids, 0, off], k)
            assert torch.equal(cache[ids, 1, off], v)
            written[ids, :, off] = True
    assert torch.count_nonzero(cache[~written]) == 0
    assert torch.count_nonzero(pool.buffer.view(num_blocks, block_bytes)[:, -TAIL_BYTES:]) == 0


def test_one_call_equals_chunked_calls_bit_for_bit_in_position() -> None:
    """A whole-sequence prefill and the same sequence fed in chunks store identical K/V."""
    layout = KVLayout(NUM_LAYERS, 2, 16, 4, 2 * 16 * 4 * 4)
    gen = torch.Generator().manual_seed(7)
    qkv = {"a": random_qkv(11, 8, 2, 16, gen)}
    caches = []
    for calls in ([[("a", 0, 11)]], [[("a", 0, 4)], [("a", 4, 10)], [("a", 10, 11)]]):
        _, cache = make_pool(layout, 12, torch.float32)
        tables = BlockTables(BlockPool(12, {"m": 12}), {"m": layout})
        run_paged(cache, tables, calls, qkv, (None, None))
        caches.append(cache)
    assert torch.equal(caches[0], caches[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", list(PATHS))
def test_half_precision_cache_is_close_to_dense(dtype: torch.dtype, path: str) -> None:
    layout = KVLayout(NUM_LAYERS, 2, 64, 2, 2 * 64 * 2 * 4)
    needed = sum(layout.physical_blocks_for(n) for n in LENGTHS.values())
    _, cache = make_pool(layout, 3 * needed, dtype)
    tables = scattered_tables(layout, 3 * needed, seed=1)
    gen = torch.Generator().manual_seed(3)
    qkv = {rid: random_qkv(n, 8, 2, 64, gen, dtype) for rid, n in LENGTHS.items()}
    outs = run_paged(cache, tables, CALLS, qkv, (None, 3), PATHS[path])
    for rid in LENGTHS:
        exact = dense_reference(
            [(q.float(), k.float(), v.float()) for q, k, v in qkv[rid]], (None, 3)
        )
        for layer in range(NUM_LAYERS):
            got = torch.cat(outs[rid][layer])
            assert got.dtype == dtype
            assert (got.float() - exact[layer]).abs().max().item() < 3e-2


def test_batch_layout_exact_values() -> None:
    t0 = np.array([[[5, 6]], [[9, 1]]], dtype=np.int32)  # 2 logical blocks, 1 layer, 2 kv heads
    t1 = np.array([[[3, 4]]], dtype=np.int32)
    t2 = np.array([[[7, 8]], [[0, 2]], [[10, 11]]], dtype=np.int32)
    seqs = [seq_work("x", 5, 6, t0), seq_work("y", 0, 3, t1), seq_work("z", 8, 10, t2)]
    b = BatchLayout.from_seqs(seqs, CPU)
    assert b.seq_of_token.tolist() == [0, 1, 1, 1, 2, 2]
    assert b.pos_of_token.tolist() == [5, 0, 1, 2, 8, 9]
    assert b.row_of_token.tolist() == [0, 0, 1, 2, 0, 1]
    assert b.q_lens.tolist() == [1, 3, 2]
    assert b.ctx_lens.tolist() == [6, 3, 10]
    assert b.block_tables.dtype == torch.int64
    assert b.block_tables.tolist() == [
        [[[5, 6]], [[9, 1]], [[0, 0]]],
        [[[3, 4]], [[0, 0]], [[0, 0]]],
        [[[7, 8]], [[0, 2]], [[10, 11]]],
    ]
    assert b.host is not None
    assert b.host.starts == (5, 0, 8) and b.host.q_lens == (1, 3, 2)
    assert [t is s.block_table for t, s in zip(b.host.tables, seqs, strict=True)] == [True] * 3


# ---- how the pool is read --------------------------------------------------------------------
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("windows", [(None, None), (None, 3)], ids=["full", "window-3"])
def test_soft_capped_scores_match_dense(path: str, windows: tuple[int | None, ...]) -> None:
    layout = KVLayout(NUM_LAYERS, 2, 16, 4, 2 * 16 * 4 * 3)
    needed = sum(layout.physical_blocks_for(n) for n in LENGTHS.values())
    _, cache = make_pool(layout, 3 * needed, torch.float32)
    tables = scattered_tables(layout, 3 * needed, seed=4)
    gen = torch.Generator().manual_seed(11)
    qkv = {rid: random_qkv(n, 8, 2, 16, gen) for rid, n in LENGTHS.items()}
    qkv = {rid: [(q * 4, k, v) for q, k, v in layers] for rid, layers in qkv.items()}  # large

    def capped(cache: torch.Tensor, seqs: list[SeqWork], w: Sequence[int | None]) -> PagedAttention:
        attention = PATHS[path](cache, seqs, w)
        attention.softcap = 2.0
        return attention

    outs = run_paged(cache, tables, CALLS, qkv, windows, capped)
    for rid in LENGTHS:
        expected = dense_reference(qkv[rid], windows, softcap=2.0)
        uncapped = dense_reference(qkv[rid], windows)
        for layer in range(NUM_LAYERS):
            got = torch.cat(outs[rid][layer])
            assert (got - expected[layer]).abs().max().item() < FP32_TOL, (rid, layer)
            assert (got - uncapped[layer]).abs().max().item() > 1e-2  # the cap did something


def decode_setup(
    lengths: dict[str, int], window: int | None, tokens_per_block: int = 4
) -> tuple[torch.Tensor, BlockTables, dict[str, list[QKV]], list[SeqWork]]:
    """Sequences prefilled to `lengths` - 1 tokens; then the SeqWork of one decode step each."""
    layout = KVLayout(NUM_LAYERS, 2, 16, 4, 2 * 16 * 4 * tokens_per_block)
    num_blocks = 3 * sum(layout.physical_blocks_for(n) for n in lengths.values())
    _, cache = make_pool(layout, num_blocks, torch.float32)
    tables = scattered_tables(layout, num_blocks, seed=5)
    gen = torch.Generator().manual_seed(6)
    qkv = {rid: random_qkv(n, 8, 2, 16, gen) for rid, n in lengths.items()}
    prefill = [[(rid, 0, n - 1) for rid, n in lengths.items()]]
    run_paged(cache, tables, prefill, qkv, (window,) * NUM_LAYERS)
    for rid, n in lengths.items():
        tables.cover("m", rid, n)
    return cache, tables, qkv, [seq_work(r, n - 1, n, tables.table(r)) for r, n in lengths.items()]


def test_a_window_reads_no_block_before_its_first_key() -> None:
    """Blocks wholly before every query's window are poisoned with NaN: the CPU path, which
    starts each read at the block of the first visible key, never sees them."""
    lengths, window, tpb = {"a": 23, "b": 9}, 6, 4
    cache, tables, qkv, seqs = decode_setup(lengths, window, tpb)
    for rid, n in lengths.items():
        first_key = n - window  # the last position, n - 1, sees n - window .. n - 1
        cache[torch.from_numpy(tables.table(rid)[: first_key // tpb]).long()] = float("nan")
    q, k, v = (torch.cat([qkv[r][0][i][n - 1 : n] for r, n in lengths.items()]) for i in range(3))
    for path in ("groups", "per-sequence"):
        out = PATHS[path](cache, seqs, (window,))(0, q, k, v)  # (2, heads, hd)
        assert torch.isfinite(out).all(), path
        for i, (rid, n) in enumerate(lengths.items()):
            want = dense_reference(qkv[rid], (window,) * NUM_LAYERS)[0][n - 1]
            assert (out[i] - want).abs().max().item() < FP32_TOL, (path, rid)


def test_kv_heads_are_never_repeated_and_a_mask_never_meets_enable_gqa(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[int, int, bool, bool]] = []  # (q heads, k heads, mask?, enable_gqa)
    sdpa = F.scaled_dot_product_attention

    def spy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> torch.Tensor:
        calls.append(
            (q.shape[1], k.shape[1], kw.get("attn_mask") is not None, bool(kw.get("enable_gqa")))
        )
        return sdpa(q, k, v, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy)
    layout = KVLayout(NUM_LAYERS, 2, 16, 4, 2 * 16 * 4 * 3)
    needed = sum(layout.physical_blocks_for(n) for n in LENGTHS.values())
    _, cache = make_pool(layout, 3 * needed, torch.float32)
    tables = scattered_tables(layout, 3 * needed, seed=2)
    gen = torch.Generator().manual_seed(8)
    qkv = {rid: random_qkv(n, 8, 2, 16, gen) for rid, n in LENGTHS.items()}
    for path in PATHS.values():
        run_paged(cache, tables, CALLS[:1], qkv, (None, 3), path)
        for rid in LENGTHS:
            tables.release(rid)
    assert calls
    assert {k for _, k, _, _ in calls} == {2}  # K/V as they are in the pool: 2 heads
    assert not [c for c in calls if c[2] and c[3]]
    # grouped-query heads went into query rows, or to enable_gqa without a mask
    assert all(qh == 2 or gqa for qh, _, _, gqa in calls)


def test_the_cpu_path_never_pads_the_block_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(tables: Sequence[np.ndarray]) -> np.ndarray:
        raise AssertionError("padded the block tables")

    monkeypatch.setattr(batch_layout, "pad_tables", refuse)
    layout = KVLayout(NUM_LAYERS, 2, 16, 4, 2 * 16 * 4 * 3)
    needed = sum(layout.physical_blocks_for(n) for n in LENGTHS.values())
    _, cache = make_pool(layout, 3 * needed, torch.float32)
    tables = scattered_tables(layout, 3 * needed, seed=3)
    gen = torch.Generator().manual_seed(9)
    qkv = {rid: random_qkv(n, 8, 2, 16, gen) for rid, n in LENGTHS.items()}
    run_paged(cache, tables, CALLS, qkv, (None, 3))
    with pytest.raises(AssertionError, match="padded"):
        run_paged(cache, tables, CALLS[-1:], qkv, (None, 3), PATHS["padded"])


def test_decodes_of_many_lengths_in_one_group_match_one_by_one() -> None:
    lengths = {"a": 3, "b": 17, "c": 8, "d": 1 + 4, "e": 30}
    for window in (None, 7):
        cache, _, qkv, seqs = decode_setup(lengths, window)
        q, k, v = (
            torch.cat([qkv[r][0][i][n - 1 : n] for r, n in lengths.items()]) for i in range(3)
        )
        grouped = PATHS["one-group"](cache.clone(), seqs, (window,))(0, q, k, v)
        alone = PATHS["per-sequence"](cache.clone(), seqs, (window,))(0, q, k, v)
        assert (grouped - alone).abs().max().item() < FP32_TOL
        for i, (rid, n) in enumerate(lengths.items()):
            want = dense_reference(qkv[rid], (window,) * NUM_LAYERS)[0][n - 1]
            assert (grouped[i] - want).abs().max().item() < FP32_TOL, (window, rid)
