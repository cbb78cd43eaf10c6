"""Acceptance numbers on a GPU: decode attention vs the copy bandwidth, and a Llama-7B
decode step vs its weight-bytes / bandwidth floor."""

from __future__ import annotations

import math
import statistics
import time
from types import ModuleType

import pytest
import torch

from muxserve.cuda_timing import cuda_time, graph_time
from muxserve.kv.block_pool import BlockPool
from muxserve.kv.block_tables import BlockTables
from muxserve.kv.layout import KVLayout
from muxserve.runner.attention import BatchLayout
from muxserve.runner.kernels import ops
from muxserve.runner.kv_pool import KVPool
from muxserve.runner.model_runner import ModelRunner
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import Job, Phase, SeqWork
from tests.gpu.conftest import Report, llama_7b_config, random_model

pytestmark = pytest.mark.gpu

MIN_BANDWIDTH_FRACTION = 0.6  # decode attention vs the measured D2D copy bandwidth
MAX_FLOOR_RATIO = 1.3  # Llama-7B decode step vs weight bytes / copy bandwidth


def test_decode_attention_bandwidth(
    kernels: ModuleType, device: torch.device, copy_bandwidth: float, report: Report
) -> None:
    """Batch 64, context 2k, 32 heads (MHA), head size 128, bf16, 16 KiB blocks shuffled."""
    batch_size, ctx, heads, hd, dtype = 64, 2048, 32, 128, torch.bfloat16
    layout = KVLayout(1, heads, hd, 2, 16 << 10)
    tpb = layout.tokens_per_block
    nlb = ctx // tpb
    num_blocks = batch_size * nlb * heads
    cache = KVPool(num_blocks, layout.block_bytes, device).view(layout, dtype)
    cache.normal_()
    ids = torch.randperm(num_blocks, device=device).view(batch_size, nlb, 1, heads)
    ctx_lens = torch.full((batch_size,), ctx, device=device)
    batch = BatchLayout(
        seq_of_token=torch.arange(batch_size, device=device),
        pos_of_token=ctx_lens - 1,
        row_of_token=torch.zeros_like(ctx_lens),
        q_lens=torch.ones_like(ctx_lens),
        ctx_lens=ctx_lens,
        block_tables=ids,
    )
    q = torch.randn(batch_size, heads, hd, device=device, dtype=dtype)
    nbytes = batch_size * ctx * heads * hd * 2 * 2 + 2 * q.numel() * 2  # K, V, q, out
    # one graph of back-to-back launches: the kernel's time, not Python's (launches: reported)
    t = graph_time(lambda: ops.decode_attention(q, cache, batch, 0, None, ctx), repeat=50)
    t_launched = cuda_time(lambda: ops.decode_attention(q, cache, batch, 0, None, ctx), 50)
    fraction = nbytes / t / copy_bandwidth
    splits = {}
    out = torch.empty_like(q)
    for n in (1, 2, 3, 4, 6, 8):
        ws = torch.empty(
            max(1, kernels.decode_workspace_floats(batch_size, heads, hd, n)), device=device
        )
        part = math.ceil(ctx / n)

        def launch(n: int = n, ws: torch.Tensor = ws, part: int = part) -> None:
            stream = torch.cuda.current_stream().cuda_stream  # the capture's, inside graph_time
            workspace = ws if n > 1 else None
            kernels.decode_attention(
                out, q, cache, ids, ctx_lens, 0, 0, hd**-0.5, n, part, workspace, stream
            )

        splits[n] = nbytes / graph_time(launch, repeat=30) / copy_bandwidth
    plan = ops.split_plan(batch_size, heads, 1, ctx, None, ops.num_sms(device))
    report(
        "decode_attention_bandwidth",
        seconds=t,
        seconds_launched_back_to_back=t_launched,
        gb_per_s=nbytes / t / 1e9,
        copy_gb_per_s=copy_bandwidth / 1e9,
        fraction=fraction,
        plan=plan,
        fraction_by_splits=splits,
    )
    assert fraction >= MIN_BANDWIDTH_FRACTION


def test_llama7b_decode_step_near_floor(
    kernels: ModuleType,
    device: torch.device,
    copy_bandwidth: float,
    report: Report,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Batch 1, bf16, random weights of real sizes, context ~128: one `execute` of a decode
    job (inputs to the device, forward, sampling, the token back on the host)."""
    config = llama_7b_config()
    model = random_model(config, torch.bfloat16, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    embed_bytes = model.model.embed_tokens.weight.numel() * 2
    layout = KVLayout(config.num_layers, config.num_kv_heads, config.head_dim, 2, 16 << 10)
    greedy = SamplingParams(temperature=0.0)
    steps: dict[str, float] = {}
    for graphs in ("1", "0"):
        monkeypatch.setenv("MUXSERVE_CUDA_GRAPHS", graphs)
        pool = KVPool(16384, layout.block_bytes, device)
        runner = ModelRunner("llama-7b", model, config, pool, layout, torch.bfloat16)
        tables = BlockTables(BlockPool(16384, {"m": 16384}), {"m": layout})
        prompt = list(range(100, 228))
        tables.cover("m", "r", len(prompt))
        seq = SeqWork("r", tuple(prompt), 0, tables.table("r"), True, greedy, 0, 0)
        token = runner.execute(Job(0, "m", Phase.PREFILL, (seq,), 1.0)).outputs[0].token_id
        times = []
        for step in range(40):
            pos = len(prompt) + step
            tables.cover("m", "r", pos + 1)
            seq = SeqWork("r", (token,), pos, tables.table("r"), True, greedy, 0, step)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = runner.execute(Job(step + 1, "m", Phase.DECODE, (seq,), 1.0))
            times.append(time.perf_counter() - t0)
            assert res.error is None, res.error
            token = res.outputs[0].token_id
        steps[graphs] = statistics.median(times[5:])  # the first steps capture / warm up
        del runner, pool
        torch.cuda.empty_cache()
    floor = weight_bytes / copy_bandwidth
    ratio = steps["1"] / floor
    report(
        "llama7b_decode_step",
        weight_bytes=weight_bytes,
        floor_s=floor,
        floor_without_embedding_s=(weight_bytes - embed_bytes) / copy_bandwidth,
        step_s_graphs=steps["1"],
        step_s_eager=steps["0"],
        ratio=ratio,
    )
    assert ratio <= MAX_FLOOR_RATIO
