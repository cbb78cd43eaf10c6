from __future__ import annotations

import pytest

from muxserve.errors import ConfigError
from placement.workload import SLO
from tests.helpers.placement import cluster, problem, spec


def test_fits_and_min_sizes() -> None:
    # 4 GiB GPUs (3.6 GiB usable): 0.13 GiB of weights fit one GPU; 3.5 GiB need two
    small, big = spec(hidden=1024, layers=4), spec(hidden=2048, layers=28)
    p = problem([small, big], [1.0, 1.0])
    assert p.min_sizes == (1, 2)
    assert p.fits(0, 1) and not p.fits(1, 1) and p.fits(1, 2)


def test_model_that_fits_nowhere_is_named() -> None:
    huge = spec(hidden=4096, layers=40)
    with pytest.raises(ConfigError, match=r"model 'm1' fits on no mesh of this cluster: .*GiB"):
        problem([spec(), huge], [1.0, 1.0])


def test_heads_that_do_not_split_are_explained() -> None:
    odd = spec(hidden=2040, layers=28, heads=3)  # needs 2 GPUs, but 3 heads do not split
    with pytest.raises(
        ConfigError, match=r"'m0'.*3 attention heads / 3 KV heads do not split over 2, 4"
    ):
        problem([odd], [1.0])


def test_slo_scale_resolves_against_the_smallest_mesh() -> None:
    s = spec()
    p = problem([s], [1.0], slo=SLO(scale=5.0))
    base_ttft = p.cost.prefill_latency(p.specs[0], 1, 1.0, 1, 100)
    base_tpot = p.cost.decode_latency(p.specs[0], 1, 1.0, 1, 150)
    assert p.targets[0].ttft == pytest.approx(5 * base_ttft)
    assert p.targets[0].tpot == pytest.approx(5 * base_tpot)
    q = problem([s], [1.0], slo=SLO(tpot=0.5))
    assert (q.targets[0].ttft, q.targets[0].tpot) == (None, 0.5)


def test_limits() -> None:
    p = problem([spec()], [2.0], cluster(nodes=2, gpus_per_node=2))
    assert p.mesh_sizes == (1, 2)
    assert p.usable_memory == 4 * 2**30 * 0.9
    assert p.sm_limit == pytest.approx(1.1)
    assert p.total_rate == 2.0
    # 200 tokens in blocks of 16 KiB / (2 × 64 × 2 bytes) = 64 tokens: 4 blocks, and one spare
    assert p.kv_bytes_per_request(0) == (4 + 1) * 64 * p.specs[0].kv_bytes_per_token
