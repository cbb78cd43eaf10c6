"""placement/mesh_replay.py: what a job asks of the device, from the cost model."""

from __future__ import annotations

import numpy as np
import pytest

from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import Job, Phase, SeqWork
from placement.mesh_replay import job_demand
from tests.helpers.placement import cluster, problem, spec


def seq(start: int, tokens: int, sample: bool = True) -> SeqWork:
    table = np.zeros((1, 1, 1), dtype=np.int32)
    return SeqWork("r", (1,) * tokens, start, table, sample, SamplingParams(), 0, 0)


@pytest.fixture
def setup() -> tuple:
    p = problem([spec(hidden=1024, layers=8)], [10.0], cluster(nodes=1, gpus_per_node=2))
    hbm = p.cluster.gpu.hbm_bytes_per_s * p.cluster.cost_model.bandwidth_efficiency
    return p, p.cost, p.specs[0], hbm


def test_a_decode_is_memory_bound_at_the_cost_models_latency(setup: tuple) -> None:
    p, cost, m, hbm = setup
    job = Job(0, "m", Phase.DECODE, (seq(99, 1), seq(199, 1)), 0.4)  # contexts 100 and 200
    d = job_demand(cost, m, 2, job, hbm)
    assert d.alone_s == cost.decode_latency(m, 2, 0.4, 2, 150.0)
    assert d.hbm == cost.decode_bytes(m, 2, 2, 150.0) / d.alone_s / hbm
    assert (d.sm, d.compute_bound) == (0.4, False)
    assert d.at_share is not None and d.at_share(0.2) == cost.decode_latency(m, 2, 0.2, 2, 150.0)
    params = p.cluster.cost_model
    fixed = params.step_overhead_s + params.per_seq_overhead_s * 2
    assert d.busy_s == max(d.alone_s - fixed, 0.1 * d.alone_s)


def test_a_prefill_is_compute_bound(setup: tuple) -> None:
    _, cost, m, hbm = setup
    job = Job(1, "m", Phase.PREFILL, (seq(0, 30), seq(0, 50)), 0.6)  # 80 tokens in 2 prompts
    d = job_demand(cost, m, 2, job, hbm)
    assert d.alone_s == cost.prefill_latency(m, 2, 0.6, 2, 40.0)
    assert d.hbm == cost.prefill_bytes(m, 2, 2, 40.0) / d.alone_s / hbm
    assert (d.sm, d.compute_bound) == (0.6, True)
    assert d.pace_on(0.6) == 1.0 and d.pace_on(0.3) < 1.0
