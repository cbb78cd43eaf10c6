"""Issue 16 on a GPU: green contexts really split the SMs, graphs captured on a partition's
stream replay there and match eager, the kernels' launch probe passes, and prefill attention
under GQA with a mask gets a fused SDPA backend.

The SM probe runs first (`-k sm_probe`): a kernel that records `%smid` for each of its blocks,
launched on two partitions at once, tells which SMs each green context's kernels ran on.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType
from typing import Any

import pytest
import torch

from muxserve.kv.block_pool import BlockPool
from muxserve.kv.block_tables import BlockTables
from muxserve.kv.layout import KVLayout
from muxserve.runner.attention import BatchLayout, PagedAttention
from muxserve.runner.kernels import ops
from muxserve.runner.kv_pool import KVPool
from muxserve.runner.model_runner import ModelRunner
from muxserve.runner.sm_partition import SMPartition, make_partitions
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import Job, Phase, SeqWork
from tests.gpu.conftest import Report, llama_7b_config, random_model

pytestmark = pytest.mark.gpu

SMID_SOURCE = r"""
extern "C" __global__ void smid_probe(int* out, int spin) {
  if (threadIdx.x == 0) {
    unsigned int sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    out[blockIdx.x] = (int)sm;
    long long start = clock64();
    while (clock64() - start < spin) {}  // keep the SM busy so blocks spread over all of them
  }
}
"""
BLOCKS_PER_SM = 8
SPIN_CYCLES = 200_000  # ~0.1 ms at 1.9 GHz


@pytest.fixture(scope="module")
def smid_kernel(device: torch.device) -> Any:
    from torch.cuda._utils import _cuda_load_module, _nvrtc_compile

    ptx, name = _nvrtc_compile(SMID_SOURCE, "smid_probe")
    return _cuda_load_module(ptx, [name])[name]


def sms_of(kernel: Any, streams: list[torch.cuda.Stream], total: int) -> list[set[int]]:
    """Launch the probe on every stream at once; the SM ids each launch's blocks ran on."""
    outs = []
    for s in streams:
        out = torch.full((BLOCKS_PER_SM * total,), -1, dtype=torch.int32, device="cuda")
        with torch.cuda.stream(s):
            kernel(grid=(out.numel(), 1, 1), block=(32, 1, 1), args=[out, SPIN_CYCLES], stream=s)
        outs.append(out)
    torch.cuda.synchronize()
    return [set(o.tolist()) for o in outs]


def green_partitions(device: torch.device, shares: dict[str, float]) -> dict[str, SMPartition]:
    pytest.importorskip("cuda.bindings.driver", reason="pip install cuda-bindings (issue 16.1)")
    parts = make_partitions(device, shares)
    assert all(p.num_sms is not None for p in parts.values()), "the driver refused green contexts"
    return parts


def test_sm_probe_green_contexts_are_disjoint(
    smid_kernel: Any, device: torch.device, report: Report
) -> None:
    total = torch.cuda.get_device_properties(device).multi_processor_count
    parts = green_partitions(device, {"a": 0.5, "b": 0.5})
    try:
        alone = {k: sms_of(smid_kernel, [p.stream], total)[0] for k, p in parts.items()}
        a, b = sms_of(smid_kernel, [parts["a"].stream, parts["b"].stream], total)
        plain = sms_of(smid_kernel, [torch.cuda.current_stream()], total)[0]
    finally:
        for p in parts.values():
            p.close()
    report(
        "sm_probe_green_contexts",
        total_sms=total,
        partition_sms={k: p.num_sms for k, p in parts.items()},
        used_alone={k: len(v) for k, v in alone.items()},
        used_together={"a": len(a), "b": len(b)},
        overlap=len(a & b),
        plain_stream_sms=len(plain),
    )
    assert a.isdisjoint(b) and alone["a"].isdisjoint(alone["b"])
    assert len(alone["a"]) <= parts["a"].num_sms and len(alone["b"]) <= parts["b"].num_sms
    assert len(plain) == total  # the probe reaches every SM when nothing confines it


def test_sm_probe_torch_per_call_green_contexts(
    smid_kernel: Any, device: torch.device, report: Report
) -> None:
    """What PyTorch issue 195378 describes, measured (reported, not asserted)."""
    from torch.cuda.green_contexts import GreenContext

    total = torch.cuda.get_device_properties(device).multi_processor_count
    ctxs = [GreenContext.create(num_sms=64, device_id=device.index or 0) for _ in range(2)]
    a, b = sms_of(smid_kernel, [c.Stream() for c in ctxs], total)
    report("sm_probe_torch_green_contexts", sms=(len(a), len(b)), overlap=len(a & b))


def test_launch_probe_passes(kernels: ModuleType, device: torch.device) -> None:
    ops.probe_kernels(kernels, device)


def test_prefill_sdpa_under_gqa_gets_a_fused_backend(device: torch.device) -> None:
    """With MATH excluded, SDPA raises if nothing fused takes the call (mask + GQA used to)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator(device=device).manual_seed(0)
    tpb, hd, kv_heads, heads = 16, 128, 8, 32
    cache = torch.randn(512, 2, tpb, hd, generator=gen, device=device).to(torch.bfloat16)
    ctx = torch.tensor([300, 180], device=device)
    q_lens = torch.tensor([100, 60], device=device)
    seq_of = torch.repeat_interleave(torch.arange(2, device=device), q_lens)
    row_of = torch.cat([torch.arange(int(n), device=device) for n in q_lens])
    starts = ctx - q_lens
    ids = torch.randperm(512, device=device)[: 2 * 19 * kv_heads]
    batch = BatchLayout(
        seq_of_token=seq_of,
        pos_of_token=starts[seq_of] + row_of,
        row_of_token=row_of,
        q_lens=q_lens,
        ctx_lens=ctx,
        block_tables=ids.view(2, 19, 1, kv_heads),  # 300 tokens: 19 blocks of 16
    )
    ref = PagedAttention(cache, batch, (None,), 100, 300)
    q = torch.randn(160, heads, hd, generator=gen, device=device).to(torch.bfloat16)
    fused = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with sdpa_kernel(fused):
        got = ops._prefill_sdpa(ref, q, 0, None)
    ref32 = PagedAttention(cache.float(), batch, (None,), 100, 300)
    want = ref32.attend(q.float(), *ref32.gather(0), None)
    err = ((got.float() - want).abs().max() / want.abs().max()).item()
    assert err < 1e-2


def test_decode_graphs_on_a_partition_stream_match_eager(
    kernels: ModuleType, device: torch.device, report: Report, monkeypatch: pytest.MonkeyPatch
) -> None:
    """warm_up on a green context's stream captures there; replays there match eager decode."""
    base = llama_7b_config()
    config = dataclasses.replace(base, num_layers=2, layer_sliding_windows=(None, None))
    model = random_model(config, torch.bfloat16, device, seed=1)
    layout = KVLayout(2, config.num_kv_heads, config.head_dim, 2, 16 << 10)
    monkeypatch.setenv("MUXSERVE_CUDA_GRAPHS", "1")
    pool = KVPool(2000, layout.block_bytes, device)
    runner = ModelRunner("m", model, config, pool, layout, torch.bfloat16)
    assert runner.graphs is not None
    parts = green_partitions(device, {"decode": 0.5})
    stream = parts["decode"].stream
    tables = BlockTables(BlockPool(2000, {"m": 2000}), {"m": layout})
    greedy = SamplingParams(temperature=0.0)
    try:
        with torch.cuda.stream(stream):
            captured = runner.graphs.warm_up(max_context=256)
        assert captured and not runner.graphs.failed
        assert {e.stream for e in runner.graphs._graphs.values()} == {int(stream.cuda_stream)}
        prompt = list(range(100, 140))
        tables.cover("m", "r", len(prompt) + 1)
        seq = SeqWork("r", tuple(prompt), 0, tables.table("r"), True, greedy, 0, 0)
        with torch.cuda.stream(stream):
            assert runner.execute(Job(0, "m", Phase.PREFILL, (seq,), 1.0)).error is None
            step = SeqWork("r", (7,), len(prompt), tables.table("r"), True, greedy, 0, 0)
            with torch.inference_mode():
                got = runner.graphs.run([step])
        torch.cuda.synchronize()
        with torch.inference_mode():
            batch = BatchLayout.from_seqs([step], device)
            attention = ops.make_attention(runner.cache, batch, (None, None), 1, step.end_pos)
            ids = torch.tensor([7], device=device)
            want = model.compute_logits(model(ids, batch.pos_of_token, attention))
    finally:
        parts["decode"].close()
    assert got is not None
    err = ((got - want).abs().max() / want.abs().max()).item()
    report("decode_graphs_on_partition", captured=len(captured), rel_err=err)
    assert err < 1e-2
