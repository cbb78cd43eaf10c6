"""muxserve.runner.kernels.ops and the decode graphs' bookkeeping, on CPU.

- dispatch: the reference on CPU, the kernel modes, which pool views the kernels can read;
- the reference path of `ops` equals `PagedAttention` bit for bit;
- the kernels themselves, built against the CPU emulation of CUDA (csrc/emulation/), against
  the reference: write_kv bit-exact, decode attention over head sizes, dtypes, GQA, windows and
  split-K, padding rows, every output element written, the binding's argument checks, and the
  demo models' logits through `KernelAttention`;
- CUDA-graph bookkeeping: buckets, keys, padded inputs, and the captured body vs the model.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from torch.utils import cpp_extension

from muxserve.kv.block_pool import BlockPool
from muxserve.kv.block_tables import BlockTables
from muxserve.kv.layout import KVLayout
from muxserve.models.loader import load_model
from muxserve.runner.attention import BatchLayout, PagedAttention
from muxserve.runner.cuda_graphs import (
    GraphKey,
    GraphPlanner,
    batch_buckets,
    bucket_for,
    context_bucket,
    decode_logits,
    pad_decode_inputs,
)
from muxserve.runner.kernels import kernel_build, ops
from muxserve.runner.kv_pool import KVPool
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import SeqWork
from tests.helpers.kernels import decode_batch, make_cache

CPU = torch.device("cpu")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- factories ---------------------------------------------------------------------------
def seq_work(rid: str, tokens: tuple[int, ...], start: int, table: np.ndarray) -> SeqWork:
    return SeqWork(rid, tokens, start, table, True, SamplingParams(temperature=0.0), 0, 0)


def exact_decode(
    q: torch.Tensor, cache: torch.Tensor, batch: BatchLayout, layer: int, window: int | None
) -> torch.Tensor:
    """Float64 decode attention over the same (rounded) inputs: the yardstick for errors."""
    ref = PagedAttention(cache.double(), batch, ())
    return ref.attend(q.double(), *ref.gather(layer), window)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


# ---- dispatch ----------------------------------------------------------------------------
@pytest.fixture
def kernels_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    yield monkeypatch


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        ("", "off"),  # the default until the kernels are validated on a GPU
        ("auto", "auto"),
        ("on", "on"),
        ("1", "on"),
        ("OFF", "off"),
        ("0", "off"),
        ("emulate", "emulate"),
    ],
)
def test_kernel_mode(kernels_env: pytest.MonkeyPatch, value: str, mode: str) -> None:
    kernels_env.setenv(ops.KERNELS_ENV, value)
    assert ops.kernel_mode() == mode


def test_kernel_mode_rejects_unknown_values(kernels_env: pytest.MonkeyPatch) -> None:
    kernels_env.setenv(ops.KERNELS_ENV, "fast")
    with pytest.raises(ValueError, match="MUXSERVE_KERNELS='fast'"):
        ops.kernel_mode()


@pytest.mark.parametrize("value", ["auto", "on", "off"])
def test_cpu_gets_the_reference(kernels_env: pytest.MonkeyPatch, value: str) -> None:
    kernels_env.setenv(ops.KERNELS_ENV, value)
    cache = make_cache(8, 4, 64, torch.float32)
    batch = decode_batch([3, 5], 4, 1, 1, 8, seed=0)
    assert ops.kernels_for(CPU) is None
    assert ops.kernels_for_cache(cache) is None
    attention = ops.make_attention(cache, batch, (None,), 1, 5)
    assert type(attention) is PagedAttention


def test_kernels_off_needs_no_cuda(kernels_env: pytest.MonkeyPatch) -> None:
    kernels_env.setenv(ops.KERNELS_ENV, "off")
    assert ops.kernels_for(torch.device("cuda")) is None  # decided before any CUDA call


@pytest.mark.parametrize(
    ("head_dim", "dtype", "tail", "compiled", "ok"),
    [
        (128, torch.bfloat16, 0, True, True),
        (128, torch.bfloat16, 16, True, True),
        (128, torch.bfloat16, 8, True, False),  # blocks not 16-byte aligned
        (4, torch.float16, 0, True, False),  # a row of 8 bytes
        (64, torch.float32, 0, False, False),  # head size without a kernel
    ],
)
def test_supports_view(
    head_dim: int, dtype: torch.dtype, tail: int, compiled: bool, ok: bool
) -> None:
    assert ops.supports_view(make_cache(4, 2, head_dim, dtype, tail), compiled) is ok


# ---- the reference path equals PagedAttention ----------------------------------------------
def mixed_job(layout: KVLayout, num_blocks: int) -> tuple[list[list[SeqWork]], BlockTables]:
    """Two calls: prefills (one chunked), then a mixed call; tables over shuffled blocks."""
    pool = BlockPool(num_blocks, {"m": num_blocks})
    ids = pool.allocate("m", num_blocks)
    pool.free("m", np.random.default_rng(0).permutation(ids))
    tables = BlockTables(pool, {"m": layout})
    calls = [[("a", 0, 7), ("b", 0, 3)], [("a", 7, 8), ("b", 3, 11), ("c", 0, 5)]]
    out = []
    for call in calls:
        seqs = []
        for rid, start, end in call:
            tables.cover("m", rid, end)
            seqs.append(seq_work(rid, (0,) * (end - start), start, tables.table(rid)))
        out.append(seqs)
    return out, tables


@pytest.mark.parametrize("window", [None, 3])
def test_reference_write_kv_equals_paged_attention(window: int | None) -> None:
    layers, heads, kv_heads, hd, tpb = 2, 4, 2, 16, 3
    layout = KVLayout(layers, kv_heads, hd, 4, 2 * tpb * hd * 4)
    calls, _ = mixed_job(layout, 120)
    pool_a, pool_b = (KVPool(120, layout.block_bytes, CPU) for _ in range(2))
    cache_a, cache_b = pool_a.view(layout, torch.float32), pool_b.view(layout, torch.float32)
    gen = torch.Generator().manual_seed(1)
    windows = (None, window)
    for seqs in calls:
        batch = BatchLayout.from_seqs(seqs, CPU)
        paged = PagedAttention(cache_a, batch, windows)
        n = int(batch.q_lens.sum())
        for layer in range(layers):
            q = torch.randn(n, heads, hd, generator=gen)
            k, v = torch.randn(2, n, kv_heads, hd, generator=gen)
            want = paged(layer, q, k, v)
            ops.write_kv(cache_b, k, v, batch, layer)
            got = PagedAttention(cache_b, batch, ()).attend_pool(layer, q, windows[layer])
            assert torch.equal(got, want)
            assert torch.equal(pool_a.buffer, pool_b.buffer)


def test_reference_decode_equals_paged_attention() -> None:
    cache = make_cache(64, 4, 32, torch.float32)
    batch = decode_batch([1, 6, 13], 4, 2, 2, 64, seed=2)
    q = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(3))
    for window in (None, 4):
        want = PagedAttention(cache, batch, ()).attend_pool(1, q, window)
        assert torch.equal(ops.decode_attention(q, cache, batch, 1, window), want)


# ---- split plan and build plan -------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "plan"),
    [
        ((64, 32, 1, 2048, None, 132), (3, 704)),  # 2048 CTAs: x3 is 46 per SM
        ((1, 32, 1, 2048, None, 132), (8, 256)),  # one sequence: as many as MIN_PARTITION allows
        ((1, 8, 4, 100, None, 132), (1, 100)),  # too short to split
        ((2, 8, 4, 32768, 1024, 132), (4, 256)),  # the window bounds the span
        ((256, 32, 1, 4096, None, 132), (1, 4096)),  # enough CTAs already
        ((1, 1, 12, 1000, None, 2), (3, 384)),  # 12 heads per kv head: 2 CTAs of 8
    ],
)
def test_split_plan(
    args: tuple[int, int, int, int, int | None, int], plan: tuple[int, int]
) -> None:
    splits, partition = ops.split_plan(*args)
    assert (splits, partition) == plan
    span = args[3] if args[4] is None else min(args[3], args[4])
    assert (splits - 1) * partition < span <= splits * partition or splits == 1


def test_build_plan_commands(tmp_path: Path) -> None:
    plan = kernel_build.build_plan("90", tmp_path) if shutil.which("nvcc") else None
    if plan is None:
        pytest.skip("nvcc not on PATH")
    assert plan.directory == tmp_path / f"90-{plan.key}"
    assert {s.name for s in plan.sources} == {p.name for p in kernel_build.CSRC.glob("*.cu")}
    cmd = plan.compile_command(plan.sources[0], "nvcc")
    assert cmd[:2] == ["nvcc", "-c"] and "arch=compute_90,code=sm_90" in cmd
    assert cmd[-1] == str(plan.directory / f"{plan.sources[0].stem}.o")
    link = plan.link_command(plan.library, "nvcc")
    assert link[:4] == ["nvcc", "-shared", "-o", str(plan.library)]
    assert kernel_build.build_plan("80", tmp_path).key != plan.key


# ---- the kernels, emulated on CPU ------------------------------------------------------------
@pytest.fixture(scope="session")
def emulated() -> ModuleType:
    """The kernels built with g++ against csrc/emulation/ (about a minute, then cached)."""
    if shutil.which(kernel_build.compiler_for(kernel_build.EMULATED)) is None:
        pytest.skip("no C++ compiler for the kernel emulation")
    if not cpp_extension.is_ninja_available():
        pytest.skip("ninja is needed to build the torch binding")
    return kernel_build.build_kernels(kernel_build.EMULATED)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("head_dim", "tail"), [(64, 16), (80, 0), (6, 4)])
def test_write_kv_matches_reference(
    emulated: ModuleType, dtype: str, head_dim: int, tail: int
) -> None:
    """Bit-exact against the reference, padding rows (position -1) write nothing; head size 6
    and the 4-byte tail take the kernel's unaligned path."""
    dt = DTYPES[dtype]
    tpb, layers, kv_heads = 5, 2, 3
    want = make_cache(90, tpb, head_dim, dt, tail, seed=4)
    got = make_cache(90, tpb, head_dim, dt, tail, seed=4)
    batch = decode_batch([3, 11, 7], tpb, layers, kv_heads, 90, seed=5)
    # a packed batch: tokens 4..7 of sequence 1, token 2 of sequence 0, token 6 of sequence 2
    batch.seq_of_token = torch.tensor([1, 1, 1, 1, 0, 2])
    batch.pos_of_token = torch.tensor([4, 5, 6, 7, 2, 6])
    gen = torch.Generator().manual_seed(6)
    k, v = torch.randn(2, 6, kv_heads, head_dim, generator=gen).to(dt)
    PagedAttention(want, batch, ()).write(1, k, v)
    seq = torch.cat([batch.seq_of_token, torch.tensor([0, 2])])
    pos = torch.cat([batch.pos_of_token, torch.tensor([-1, -1])])  # two padding rows
    kp = torch.cat([k, torch.full((2, kv_heads, head_dim), 7.0, dtype=dt)])
    vp = torch.cat([v, torch.full((2, kv_heads, head_dim), 7.0, dtype=dt)])
    emulated.write_kv(got, kp, vp, batch.block_tables, seq, pos, 1, 0)
    assert bytes(got.untyped_storage()) == bytes(want.untyped_storage())  # tails included


DECODE_CASES = [
    # head_dim, heads, kv_heads, window, splits
    (16, 16, 1, None, 2),  # 16 query heads per kv head: two CTAs of 8
    (32, 6, 2, 7, 3),  # groups of 3 (GMAX 4, one idle slot), window, 3 splits
    (64, 4, 4, None, 1),  # MHA
    (80, 8, 2, None, 2),
    (96, 12, 4, 5, 1),
    (128, 8, 1, None, 4),  # MQA, more splits than some sequences have tokens
    (256, 4, 2, 3, 2),
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("head_dim", "heads", "kv_heads", "window", "splits"), DECODE_CASES)
def test_decode_matches_reference(
    emulated: ModuleType,
    dtype: str,
    head_dim: int,
    heads: int,
    kv_heads: int,
    window: int | None,
    splits: int,
) -> None:
    dt = DTYPES[dtype]
    tpb = 5
    cache = make_cache(400, tpb, head_dim, dt, seed=head_dim)
    ctx = [1, 13, 9, 20, 2]
    batch = decode_batch(ctx, tpb, 2, kv_heads, 400, seed=head_dim)
    q = torch.randn(len(ctx), heads, head_dim, generator=torch.Generator().manual_seed(7)).to(dt)
    out = torch.full_like(q, float("nan"))  # every element must be written
    partition = math.ceil(max(ctx) / splits)
    ws = torch.empty(emulated.decode_workspace_floats(len(ctx), heads, head_dim, splits))
    emulated.decode_attention(
        out,
        q,
        cache,
        batch.block_tables,
        batch.ctx_lens,
        1,
        window or 0,
        1 / math.sqrt(head_dim),
        splits,
        partition,
        ws if splits > 1 else None,
        0,
    )
    assert not out.isnan().any()
    exact = exact_decode(q, cache, batch, 1, window)
    assert rel_err(out, exact) < (1e-5 if dt == torch.float32 else 1e-2)


@pytest.mark.slow
def test_decode_padding_rows_are_zero_and_splits_agree(emulated: ModuleType) -> None:
    cache = make_cache(200, 4, 64, torch.float32, seed=8)
    batch = decode_batch([9, 30, 5], 4, 1, 2, 200, seed=8)
    batch.ctx_lens = torch.tensor([9, 0, 5])  # row 1 is a graph bucket's padding
    q = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(9))
    outs = []
    for splits, partition in ((1, 9), (3, 2), (2, 100)):  # 2 x 100: the last splits are empty
        out = torch.full_like(q, float("nan"))
        ws = torch.empty(emulated.decode_workspace_floats(3, 4, 64, splits))
        emulated.decode_attention(
            out,
            q,
            cache,
            batch.block_tables,
            batch.ctx_lens,
            0,
            0,
            0.125,
            splits,
            partition,
            ws if splits > 1 else None,
            0,
        )
        assert torch.equal(out[1], torch.zeros(4, 64))
        outs.append(out)
    for out in outs[1:]:
        assert (out - outs[0]).abs().max() < 1e-6


@pytest.mark.slow
def test_binding_checks_its_arguments(emulated: ModuleType) -> None:
    cache = make_cache(16, 4, 64, torch.float16)
    batch = decode_batch([3], 4, 1, 1, 16, seed=0)
    q = torch.zeros(1, 2, 64, dtype=torch.float16)
    args = (batch.block_tables, batch.ctx_lens, 0, 0, 0.1, 1, 4, None, 0)
    with pytest.raises(RuntimeError, match="must have the cache's dtype"):
        emulated.decode_attention(torch.empty_like(q), q.float(), cache, *args)
    with pytest.raises(RuntimeError, match="2 splits need a workspace"):
        emulated.decode_attention(torch.empty_like(q), q, cache, *args[:5], 2, 4, None, 0)
    with pytest.raises(RuntimeError, match="cache must be the pool's view"):
        emulated.decode_attention(torch.empty_like(q), q, cache.transpose(2, 3), *args)
    with pytest.raises(RuntimeError, match="no kernel compiled for this head size"):
        small = make_cache(16, 4, 40, torch.float16)
        q40 = torch.zeros(1, 2, 40, dtype=torch.float16)
        emulated.decode_attention(torch.empty_like(q40), q40, small, *args)
    with pytest.raises(RuntimeError, match="unsupported shape"):  # 3 heads over 2 kv heads
        q3 = torch.zeros(1, 3, 64, dtype=torch.float16)
        tables = batch.block_tables.expand(-1, -1, -1, 2)
        emulated.decode_attention(torch.empty_like(q3), q3, cache, tables, *args[1:])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-demo", "qwen-demo", "mistral-demo"])
def test_kernel_attention_matches_reference_logits(
    emulated: ModuleType,
    kernels_env: pytest.MonkeyPatch,
    demo_models: dict[str, Path],
    name: str,
) -> None:
    """A demo model's prefill (chunked, packed) and decode steps through `make_attention` with
    the emulated kernels give the reference's logits; the pools end up (nearly) equal."""
    model, config = load_model(demo_models[name], torch.float32, CPU)
    layout = KVLayout(config.num_layers, config.num_kv_heads, config.head_dim, 4, 1536)
    pools = {mode: KVPool(300, layout.block_bytes, CPU) for mode in ("off", "emulate")}
    tables = BlockTables(BlockPool(300, {"m": 300}), {"m": layout})
    prompts = {"a": list(range(10, 27)), "b": list(range(40, 49))}
    steps = [[("a", 0, 9), ("b", 0, 9)], [("a", 9, 17)]] + [
        [("a", n, n + 1), ("b", n - 8, n - 7)] for n in range(17, 20)
    ]
    for step in steps:
        seqs = []
        for rid, start, end in step:
            tables.cover("m", rid, end)
            toks = prompts[rid][start:end] if end <= len(prompts[rid]) else [5] * (end - start)
            seqs.append(seq_work(rid, tuple(toks), start, tables.table(rid)))
        ids = torch.tensor([t for s in seqs for t in s.token_ids])
        logits = {}
        for mode, pool in pools.items():
            kernels_env.setenv(ops.KERNELS_ENV, mode)
            batch = BatchLayout.from_seqs(seqs, CPU)
            cache = pool.view(layout, torch.float32)
            max_q = max(len(s.token_ids) for s in seqs)
            attention = ops.make_attention(
                cache, batch, config.layer_sliding_windows, max_q, max(s.end_pos for s in seqs)
            )
            assert (type(attention) is ops.KernelAttention) == (mode == "emulate")
            with torch.inference_mode():
                hidden = model(ids, batch.pos_of_token, attention)
                logits[mode] = model.compute_logits(hidden)
        assert (logits["off"] - logits["emulate"]).abs().max() < 1e-4, step
    # K/V of layer 0 are bit-equal; later layers' differ by SDPA's rounding (prefill)
    views = [pool.view(layout, torch.float32) for pool in pools.values()]
    assert (views[0] - views[1]).abs().max() < 1e-4


# ---- CUDA graphs: bookkeeping --------------------------------------------------------------
def test_batch_buckets() -> None:
    assert batch_buckets(256) == (
        1,
        2,
        4,
        8,
        16,
        24,
        32,
        40,
        48,
        56,
        64,
        96,
        128,
        160,
        192,
        224,
        256,
    )
    assert batch_buckets(10) == (1, 2, 4, 8, 10)
    assert batch_buckets(1) == (1,)
    assert batch_buckets(100) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 96, 100)


def test_bucket_for_and_context_bucket() -> None:
    buckets = batch_buckets(64)
    assert [bucket_for(n, buckets) for n in (1, 3, 8, 9, 63, 64, 65)] == [
        1,
        4,
        8,
        16,
        64,
        64,
        None,
    ]
    assert [context_bucket(c, 4096) for c in (1, 256, 257, 1000, 4096, 4097)] == [
        256,
        256,
        512,
        1024,
        4096,
        None,
    ]
    assert context_bucket(700, 600) is None and context_bucket(500, 600) == 512
    assert context_bucket(300, 400) == 400  # the model's limit caps the bucket


def planner(**kw: int) -> GraphPlanner:
    args = {"max_context": 4096, "tokens_per_block": 32, "num_layers": 2, "num_kv_heads": 2}
    return GraphPlanner(batch_buckets(64), **{**args, **kw})


def test_graph_planner_keys() -> None:
    table = np.zeros((1, 2, 2), dtype=np.int32)
    p = planner()
    decode = [seq_work(str(i), (1,), 100 + i, table) for i in range(3)]
    assert p.key_for(decode) == GraphKey(4, 256)
    assert p.key_for([seq_work("x", (1,), 300, table)]) == GraphKey(1, 512)
    assert p.key_for([seq_work("x", (1, 2), 0, table)]) is None  # a prefill chunk
    assert p.key_for([]) is None
    assert p.key_for([seq_work(str(i), (1,), 5, table) for i in range(65)]) is None
    assert p.key_for([seq_work("x", (1,), 4096, table)]) is None  # context 4097
    assert p.table_width(4096) == 128
    assert p.table_bytes(GraphKey(64, 4096)) == 64 * 128 * 2 * 2 * 8
    small = planner(max_table_bytes=4 * 16 * 2 * 2 * 8)  # a bucket of 4 x 512 tokens at most
    assert small.key_for(decode) == GraphKey(4, 256)
    longer = [*decode, seq_work("y", (1,), 400, table)]
    assert small.key_for(longer) == GraphKey(4, 512)  # 2048 bytes: just fits
    assert small.key_for([*longer, seq_work("z", (1,), 1, table)]) is None  # 8 x 512


def test_pad_decode_inputs_exact() -> None:
    t0 = np.array([[[5, 6]], [[9, 1]]], dtype=np.int32)  # (2 logical, 1 layer, 2 kv heads)
    t1 = np.array([[[3, 4]]], dtype=np.int32)
    seqs = [seq_work("a", (11,), 5, t0), seq_work("b", (12,), 0, t1)]
    x = pad_decode_inputs(seqs, GraphKey(4, 256), 3, 1, 2)
    assert x.input_ids.tolist() == [11, 12, 0, 0]
    assert x.positions.tolist() == [5, 0, 0, 0]
    assert x.pos_of_token.tolist() == [5, 0, -1, -1]
    assert x.ctx_lens.tolist() == [6, 1, 0, 0]
    assert x.block_tables.shape == (4, 3, 1, 2) and x.block_tables.dtype == np.int64
    assert x.block_tables[:, :, 0].tolist() == [
        [[5, 6], [9, 1], [0, 0]],
        [[3, 4], [0, 0], [0, 0]],
        [[0, 0], [0, 0], [0, 0]],
        [[0, 0], [0, 0], [0, 0]],
    ]


def test_decode_body_equals_the_model(demo_models: dict[str, Path]) -> None:
    """The captured body (embedding, layers, norm, head with cos/sin passed in) gives the
    model's own forward's logits, so a graph replays what eager decode computes."""
    for name, folder in demo_models.items():
        model, config = load_model(folder, torch.float32, CPU)
        layout = KVLayout(config.num_layers, config.num_kv_heads, config.head_dim, 4, 1536)
        tables = BlockTables(BlockPool(100, {"m": 100}), {"m": layout})
        tables.cover("m", "a", 6)
        seqs = [seq_work("a", (3, 4, 5, 6, 7, 8), 0, tables.table("a"))]
        batch = BatchLayout.from_seqs(seqs, CPU)
        ids = torch.tensor(seqs[0].token_ids)
        pools = [KVPool(100, 1536, CPU).view(layout, torch.float32) for _ in range(2)]
        with torch.inference_mode():
            want = model.compute_logits(
                model(
                    ids,
                    batch.pos_of_token,
                    PagedAttention(pools[0], batch, config.layer_sliding_windows),
                )
            )
            cos, sin = model.model.rotary_emb(batch.pos_of_token, torch.float32)
            got = decode_logits(
                model, ids, cos, sin, PagedAttention(pools[1], batch, config.layer_sliding_windows)
            )
        assert torch.equal(got, want), name


@pytest.mark.slow
def test_padded_graph_inputs_give_the_eager_result(
    emulated: ModuleType, kernels_env: pytest.MonkeyPatch, demo_models: dict[str, Path]
) -> None:
    """A decode batch padded to a graph bucket, through the emulated kernels: the real rows'
    logits are the unpadded batch's, and the pool is written alike (padding writes nothing).
    This is what a replay computes, minus the capture."""
    kernels_env.setenv(ops.KERNELS_ENV, "emulate")
    model, config = load_model(demo_models["qwen-demo"], torch.float32, CPU)
    layout = KVLayout(config.num_layers, config.num_kv_heads, config.head_dim, 4, 1536)
    tables = BlockTables(BlockPool(200, {"m": 200}), {"m": layout})
    pools = [KVPool(200, 1536, CPU) for _ in range(2)]
    caches = [p.view(layout, torch.float32) for p in pools]
    for rid, n in (("a", 14), ("b", 30), ("c", 3)):
        tables.cover("m", rid, n)
    seqs = [seq_work(r, (9,), n - 1, tables.table(r)) for r, n in (("a", 14), ("b", 30), ("c", 3))]
    p = GraphPlanner(
        batch_buckets(8), 1024, layout.tokens_per_block, config.num_layers, config.num_kv_heads
    )
    key = p.key_for(seqs)
    assert key == GraphKey(4, 256)
    x = pad_decode_inputs(seqs, key, p.table_width(key.context), p.num_layers, p.num_kv_heads)
    padded = BatchLayout(
        seq_of_token=torch.arange(4),
        pos_of_token=torch.from_numpy(x.pos_of_token),
        row_of_token=torch.zeros(4, dtype=torch.int64),
        q_lens=torch.ones(4, dtype=torch.int64),
        ctx_lens=torch.from_numpy(x.ctx_lens),
        block_tables=torch.from_numpy(x.block_tables),
    )
    with torch.inference_mode():
        eager_batch = BatchLayout.from_seqs(seqs, CPU)
        eager = ops.make_attention(caches[0], eager_batch, config.layer_sliding_windows, 1, 30)
        want = model.compute_logits(model(torch.tensor([9, 9, 9]), eager_batch.pos_of_token, eager))
        graphed = ops.make_attention(
            caches[1], padded, config.layer_sliding_windows, 1, key.context
        )
        cos, sin = model.model.rotary_emb(torch.from_numpy(x.positions), torch.float32)
        got = decode_logits(model, torch.from_numpy(x.input_ids), cos, sin, graphed)
    assert (got[:3] - want).abs().max() < 1e-5
    # equal up to the rounding of matmuls over 3 rows vs 4: a padding write would be far off
    assert (caches[0] - caches[1]).abs().max() < 1e-5
