"""The CUDA kernels against the torch reference on fresh random inputs (acceptance: bf16
relative error under 1e-2, every output element written), and decode graphs against eager."""

from __future__ import annotations

import dataclasses
import math
import time
from types import ModuleType

import pytest
import torch

from muxserve.kv.block_pool import BlockPool
from muxserve.kv.block_tables import BlockTables
from muxserve.kv.layout import KVLayout
from muxserve.runner.attention import BatchLayout, PagedAttention
from muxserve.runner.kernels import ops
from muxserve.runner.kv_pool import KVPool
from muxserve.runner.model_runner import ModelRunner
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import Job, Phase, SeqWork
from tests.gpu.conftest import Report, llama_7b_config, random_model

pytestmark = pytest.mark.gpu

SEED = int(time.time())  # fresh inputs every run; printed so a failure can be replayed
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def make_cache(
    num_blocks: int,
    block_bytes: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    gen: torch.Generator,
) -> torch.Tensor:
    item = torch.empty((), dtype=dtype).element_size()
    layout = KVLayout(1, 1, head_dim, item, block_bytes)
    cache = KVPool(num_blocks, block_bytes, device).view(layout, dtype)
    cache.copy_(torch.randn(cache.shape, generator=gen, device=device).to(dtype))
    return cache


def decode_batch(
    ctx: list[int],
    tpb: int,
    layers: int,
    kv_heads: int,
    num_blocks: int,
    device: torch.device,
    gen: torch.Generator,
) -> BatchLayout:
    nlb = max(-(-c // tpb) for c in ctx)
    n = len(ctx) * nlb * layers * kv_heads
    ids = torch.randperm(num_blocks, generator=gen, device=device)[:n]
    ctx_t = torch.tensor(ctx, device=device)
    return BatchLayout(
        seq_of_token=torch.arange(len(ctx), device=device),
        pos_of_token=ctx_t - 1,
        row_of_token=torch.zeros(len(ctx), dtype=torch.int64, device=device),
        q_lens=torch.ones(len(ctx), dtype=torch.int64, device=device),
        ctx_lens=ctx_t,
        block_tables=ids.view(len(ctx), nlb, layers, kv_heads).contiguous(),
    )


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def exact_decode(
    q: torch.Tensor, cache: torch.Tensor, batch: BatchLayout, layer: int, window: int | None
) -> torch.Tensor:
    """The reference in float32 over the same (rounded) inputs."""
    ref = PagedAttention(cache.float(), batch, ())
    return ref.attend(q.float(), *ref.gather(layer), window)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
def test_write_kv_is_bit_exact(
    kernels: ModuleType, device: torch.device, dtype: str, head_dim: int
) -> None:
    dt = DTYPES[dtype]
    gen = torch.Generator(device=device).manual_seed(SEED)
    item = torch.empty((), dtype=dt).element_size()
    block_bytes = 2 * 16 * head_dim * item + 64
    want = make_cache(3000, block_bytes, head_dim, dt, device, gen)
    got = KVPool(3000, block_bytes, device).view(KVLayout(1, 1, head_dim, item, block_bytes), dt)
    got.copy_(want)
    batch = decode_batch([100, 7, 300, 1], want.shape[2], 4, 8, 3000, device, gen)
    k, v = torch.randn(2, 4, 8, head_dim, generator=gen, device=device).to(dt)
    PagedAttention(want, batch, ()).write(2, k, v)
    kernels.write_kv(
        got,
        k,
        v,
        batch.block_tables,
        batch.seq_of_token,
        batch.pos_of_token,
        2,
        torch.cuda.current_stream().cuda_stream,
    )
    torch.cuda.synchronize()
    assert torch.equal(got, want), f"seed {SEED}"


CASES = [  # head_dim, heads, kv_heads, window
    (64, 32, 32, None),
    (80, 32, 8, None),
    (96, 24, 8, 100),
    (128, 32, 32, None),
    (128, 32, 8, None),  # Llama-3-8B
    (128, 64, 8, None),  # Llama-3-70B per-GPU at TP1
    (128, 32, 2, 4096),
    (128, 28, 4, None),  # Qwen2-7B: 7 query heads per kv head
    (256, 16, 16, None),
    (32, 4, 4, None),
    (16, 8, 2, None),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("head_dim", "heads", "kv_heads", "window"), CASES)
@pytest.mark.parametrize("splits", [None, 1, 7])
def test_decode_matches_reference(
    kernels: ModuleType,
    device: torch.device,
    report: Report,
    dtype: str,
    head_dim: int,
    heads: int,
    kv_heads: int,
    window: int | None,
    splits: int | None,
) -> None:
    dt = DTYPES[dtype]
    gen = torch.Generator(device=device).manual_seed(SEED + head_dim)
    item = torch.empty((), dtype=dt).element_size()
    block_bytes = 16 << 10
    tpb = block_bytes // (2 * head_dim * item)
    ctx = [1, 17, 513, 2000, 4500, 3]
    num_blocks = len(ctx) * -(-max(ctx) // tpb) * 2 * kv_heads + 64  # what decode_batch takes
    cache = make_cache(num_blocks, block_bytes, head_dim, dt, device, gen)
    batch = decode_batch(ctx, tpb, 2, kv_heads, num_blocks, device, gen)
    q = torch.randn(len(ctx), heads, head_dim, generator=gen, device=device).to(dt)
    if splits is None:  # the production path, its own split plan
        out = ops.decode_attention(q, cache, batch, 1, window, max(ctx))
    else:
        out = torch.full_like(q, float("nan"))  # every element must be written
        partition = math.ceil(max(ctx) / splits)
        ws = torch.empty(
            max(1, kernels.decode_workspace_floats(len(ctx), heads, head_dim, splits)),
            device=device,
        )
        kernels.decode_attention(
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
            torch.cuda.current_stream().cuda_stream,
        )
    assert not out.isnan().any(), f"seed {SEED}"
    err = rel_err(out, exact_decode(q, cache, batch, 1, window))
    report(
        "decode_vs_reference",
        dtype=dtype,
        head_dim=head_dim,
        heads=heads,
        kv_heads=kv_heads,
        window=window,
        splits=splits,
        rel_err=err,
        seed=SEED,
    )
    assert err < TOL[dt], f"seed {SEED}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("window", [None, 64])
def test_prefill_matches_reference(
    kernels: ModuleType, device: torch.device, report: Report, dtype: str, window: int | None
) -> None:
    """Chunked, packed prefill (SDPA over the gathered pool) against the fp32 reference."""
    dt = DTYPES[dtype]
    gen = torch.Generator(device=device).manual_seed(SEED)
    heads, kv_heads, hd, layers = 32, 8, 128, 2
    layout = KVLayout(layers, kv_heads, hd, 2, 16 << 10)
    blocks = BlockPool(4000, {"m": 4000})
    tables = BlockTables(blocks, {"m": layout})
    pool = KVPool(4000, layout.block_bytes, device)
    cache = pool.view(layout, dt)
    calls = [[("a", 0, 300), ("b", 0, 77)], [("a", 300, 301), ("b", 77, 600), ("c", 0, 33)]]
    for call in calls:
        seqs = []
        for rid, start, end in call:
            tables.cover("m", rid, end)
            seqs.append(
                SeqWork(
                    rid,
                    (0,) * (end - start),
                    start,
                    tables.table(rid),
                    True,
                    SamplingParams(),
                    0,
                    0,
                )
            )
        batch = BatchLayout.from_seqs(seqs, device)
        n = int(batch.q_lens.sum())
        q = torch.randn(n, heads, hd, generator=gen, device=device).to(dt)
        k, v = torch.randn(2, n, kv_heads, hd, generator=gen, device=device).to(dt)
        attention = ops.make_attention(
            cache,
            batch,
            [window] * layers,
            max(len(s.token_ids) for s in seqs),
            max(s.end_pos for s in seqs),
        )
        assert isinstance(attention, ops.KernelAttention)
        got = attention(1, q, k, v)
        ref = PagedAttention(cache.float(), batch, [window] * layers)
        want = ref.attend(q.float(), *ref.gather(1), window)
        err = rel_err(got, want)
        report("prefill_vs_reference", dtype=dtype, window=window, rel_err=err, seed=SEED)
        assert err < 1e-2, f"seed {SEED}"


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_decode_graphs_match_eager(
    kernels: ModuleType,
    device: torch.device,
    report: Report,
    monkeypatch: pytest.MonkeyPatch,
    batch_size: int,
) -> None:
    """A 2-layer model of Llama-7B width, fed the same tokens: a graph replay's logits equal
    eager decode's (up to bf16 GEMM rounding at another batch shape) over several steps with
    growing contexts, and `execute` samples through the graphs."""
    base = llama_7b_config()
    config = dataclasses.replace(base, num_layers=2, layer_sliding_windows=(None, None))
    model = random_model(config, torch.bfloat16, device, seed=SEED)
    layout = KVLayout(2, config.num_kv_heads, config.head_dim, 2, 16 << 10)
    runners, tables = {}, {}
    for graphs in ("1", "0"):
        monkeypatch.setenv("MUXSERVE_CUDA_GRAPHS", graphs)
        pool = KVPool(4000, layout.block_bytes, device)
        runners[graphs] = ModelRunner("m", model, config, pool, layout, torch.bfloat16)
        tables[graphs] = BlockTables(BlockPool(4000, {"m": 4000}), {"m": layout})
    graphed = runners["1"].graphs
    assert graphed is not None and runners["0"].graphs is None
    greedy = SamplingParams(temperature=0.0)
    gen = torch.Generator().manual_seed(SEED)
    prompts = {
        f"r{i}": torch.randint(0, 32000, (20 + 7 * i,), generator=gen).tolist()
        for i in range(batch_size)
    }

    def seqs_for(g: str, tokens: dict[str, list[int]], start: dict[str, int]) -> list[SeqWork]:
        out = []
        for rid, toks in tokens.items():
            tables[g].cover("m", rid, start[rid] + len(toks))
            out.append(
                SeqWork(rid, tuple(toks), start[rid], tables[g].table(rid), True, greedy, 0, 0)
            )
        return out

    zero = dict.fromkeys(prompts, 0)
    for g, runner in runners.items():
        res = runner.execute(Job(0, "m", Phase.PREFILL, tuple(seqs_for(g, prompts, zero)), 1.0))
        assert res.error is None, res.error
    for step in range(6):
        start = {rid: len(p) + step for rid, p in prompts.items()}
        draws = torch.randint(0, 32000, (batch_size,), generator=gen).tolist()
        tokens = {rid: [t] for rid, t in zip(prompts, draws, strict=True)}
        with torch.inference_mode():
            got = graphed.run(seqs_for("1", tokens, start))
            seqs = seqs_for("0", tokens, start)
            batch = BatchLayout.from_seqs(seqs, device)
            attention = ops.make_attention(
                runners["0"].cache, batch, (None, None), 1, max(s.end_pos for s in seqs)
            )
            ids = torch.tensor([t[0] for t in tokens.values()], device=device)
            want = model.compute_logits(model(ids, batch.pos_of_token, attention))
        assert got is not None
        err = rel_err(got, want)
        assert err < 1e-2, f"step {step}, seed {SEED}: {err}"
    # and execute() samples through a graph
    start = {rid: len(p) + 6 for rid, p in prompts.items()}
    res = runners["1"].execute(
        Job(9, "m", Phase.DECODE, tuple(seqs_for("1", {rid: [5] for rid in prompts}, start)), 1.0)
    )
    assert res.error is None and all(o.token_id is not None for o in res.outputs)
    report(
        "decode_graphs_match_eager",
        batch=batch_size,
        rel_err=err,
        graphs=[tuple(k) for k in graphed.captured],
    )
    assert graphed.captured
