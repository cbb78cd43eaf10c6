from __future__ import annotations

import pytest

from muxserve.config import EngineConfig
from placement.cost_model import AnalyticCostModel
from placement.params import AnalyticParams
from tests.helpers.placement import gpu, spec

IDEAL = AnalyticParams(
    compute_efficiency=1.0,
    bandwidth_efficiency=1.0,
    sm_bandwidth_saturation=0.5,
    sm_bandwidth_exponent=1.0,
    sm_compute_exponent=1.0,
    kv_read="roofline",
    step_overhead_s=0.0,
    prefill_overhead_s=0.0,
    per_seq_overhead_s=0.0,
    allreduce_latency_s=0.0,
    reserve_bytes_per_model=0,
)


def model() -> AnalyticCostModel:
    # 1 TFLOP/s, 1 GB/s: latencies are FLOPs / 1e12 and bytes / 1e9
    return AnalyticCostModel(gpu(peak_tflops=1.0, hbm_gbps=1.0, interconnect_gbps=1.0), IDEAL)


def test_decode_is_bandwidth_bound() -> None:
    s, cm = spec(), model()
    assert cm.decode_latency(s, 1, 1.0, 1, 0) == pytest.approx(s.weight_bytes / 1e9)
    with_kv = s.weight_bytes + 4 * 100 * s.kv_bytes_per_token
    assert cm.decode_latency(s, 1, 1.0, 4, 100) == pytest.approx(with_kv / 1e9)


def test_prefill_is_compute_bound() -> None:
    s, cm = spec(), model()
    flops = 2 * 1000 * s.flops_per_token(500)  # 2 prompts of 1000 tokens, mean context 500
    assert cm.prefill_latency(s, 1, 1.0, 2, 1000) == pytest.approx(flops / 1e12)


def test_sm_share_scales_compute_and_bandwidth() -> None:
    s, cm = spec(), model()
    assert cm.bandwidth_share(0.25) == 0.5
    assert cm.bandwidth_share(0.8) == 1.0
    # a decode keeps full bandwidth down to the saturation share, then slows in proportion
    assert cm.decode_latency(s, 1, 0.5, 1, 0) == cm.decode_latency(s, 1, 1.0, 1, 0)
    assert cm.decode_latency(s, 1, 0.25, 1, 0) == pytest.approx(
        2 * cm.decode_latency(s, 1, 1, 1, 0)
    )
    # a compute-bound prefill slows in proportion to its share
    assert cm.prefill_latency(s, 1, 0.5, 1, 2000) == pytest.approx(
        2 * cm.prefill_latency(s, 1, 1.0, 1, 2000)
    )


def test_tensor_parallel_splits_work_and_adds_allreduce() -> None:
    s, cm = spec(), model()
    tokens = 8
    ring = 2 * (2 - 1) / 2 * tokens * s.config.hidden_size * 2 / 1e9
    allreduce = 2 * s.config.num_layers * ring
    assert cm.allreduce_time(s, 2, tokens) == pytest.approx(allreduce)
    assert cm.decode_latency(s, 2, 1.0, tokens, 0) == pytest.approx(
        (s.weight_bytes / 2) / 1e9 + allreduce
    )
    assert cm.allreduce_time(s, 1, tokens) == 0.0


def test_overheads_add() -> None:
    s = spec()
    params = IDEAL.model_copy(update={"step_overhead_s": 0.001, "per_seq_overhead_s": 1e-4})
    cm = AnalyticCostModel(gpu(peak_tflops=1.0, hbm_gbps=1.0), params)
    assert cm.decode_latency(s, 1, 1.0, 10, 0) == pytest.approx(
        model().decode_latency(s, 1, 1.0, 10, 0) + 0.001 + 10 * 1e-4
    )


def test_memory_before_kv() -> None:
    s, cm = spec(hidden=512, layers=4, heads=8, vocab=1000), model()
    eng = EngineConfig(prefill_token_budget=100, max_batch_size=10)
    per_token = 2 * 512 + (512 + 2 * 512 + 2 * 2048) / 2
    act = 100 * per_token * 2 + 10 * 1000 * 4
    assert cm.activation_bytes(s, 2, eng) == act
    assert cm.fixed_bytes(s, 2, eng) == s.weight_bytes / 2 + act
