from __future__ import annotations

import numpy as np
import pytest

from placement.baselines import solve_spatial
from placement.greedy import solve_greedy
from placement.simulator import MeshCache, arrival_times, simulate
from tests.helpers.placement import cluster, problem, spec


def test_arrivals() -> None:
    rng = np.random.default_rng(0)
    poisson = arrival_times(50.0, 200.0, "poisson", 1.0, rng)
    assert len(poisson) == pytest.approx(50 * 200, rel=0.03)
    assert all(0 <= a < 200 for a in poisson) and poisson == sorted(poisson)
    bursty = np.diff(arrival_times(50.0, 200.0, "gamma", 3.0, rng))
    assert np.std(bursty) / np.mean(bursty) == pytest.approx(3.0, rel=0.15)


def light() -> tuple:
    p = problem([spec(), spec()], [4.0, 2.0], cluster(nodes=1, gpus_per_node=1), output=50)
    return p, solve_greedy(p, progress=None)


def test_light_load_is_served_within_slo() -> None:
    p, plan = light()
    sim = simulate(plan, p, window_s=35.0, seed=1)
    assert [m.name for m in sim.models] == [m.name for m in plan.models]
    by = {m.name: m for m in sim.models}
    assert by["m0"].throughput == pytest.approx(4.0, rel=0.2)
    assert by["m1"].throughput == pytest.approx(2.0, rel=0.25)
    assert sim.slo_attainment > 0.95
    for m in sim.models:
        assert m.completed == m.arrived
        assert m.ttft_p50 is not None and m.ttft_p50 <= m.ttft_p99  # type: ignore[operator]
        assert m.tpot_p50 is not None and m.tpot_p50 <= p.targets[0].tpot


def test_deterministic_for_a_seed() -> None:
    p, plan = light()
    a = simulate(plan, p, window_s=8.0, seed=3)
    b = simulate(plan, p, window_s=8.0, seed=3)
    assert a == b


def test_overload_shows_in_throughput_and_slo() -> None:
    p = problem(
        [spec(hidden=1024, layers=8)], [2000.0], cluster(nodes=1, gpus_per_node=1), output=50
    )
    plan = solve_spatial(p)
    sim = simulate(plan, p, window_s=4.0, min_warmup_s=2.0)
    (m,) = sim.models
    assert m.throughput < 2000.0 * 0.5
    assert m.slo_attainment < 0.5


def two_busy_models() -> tuple:
    """Two models of 2048 hidden on one GPU, each at 20 req/s: their jobs overlap often."""
    specs = [spec("a", hidden=2048, layers=8), spec("b", hidden=2048, layers=8)]
    p = problem(specs, [20.0, 20.0], cluster(nodes=1, gpus_per_node=1), output=50)
    return p, solve_greedy(p, progress=None)


def test_contention_modes() -> None:
    p, plan = two_busy_models()
    sims = {
        mode: simulate(plan, p, window_s=4.0, min_warmup_s=1.0, seed=1, contention=mode)
        for mode in ("none", "start", "shared")
    }
    # `start` is the simulator before processor sharing: these are its numbers at dd5892d
    old = sims["start"].models
    assert [m.throughput for m in old] == [18.13, 18.77]
    assert [m.tpot_p50 for m in old] == [0.007565795885931113, 0.007555705939934904]
    assert {m: s.contended_meshes for m, s in sims.items()} == {"none": 0, "start": 1, "shared": 1}
    assert sims["shared"].contention == "shared"
    for shared, alone in zip(sims["shared"].models, sims["none"].models, strict=True):
        assert shared.arrived == alone.arrived  # the same arrivals
        assert shared.tpot_p50 > alone.tpot_p50  # type: ignore[operator]


def test_mesh_cache_replays_a_mesh_once() -> None:
    p = problem([spec(), spec()], [4.0, 2.0], cluster(nodes=1, gpus_per_node=2), output=50)
    plan = solve_spatial(p)  # one job at a time on each mesh: nothing is ever slowed
    cache = MeshCache(p)
    shared = simulate(plan, p, window_s=3.0, min_warmup_s=1.0, cache=cache)
    assert (cache.hits, cache.misses) == (0, len(plan.meshes))
    assert shared.contended_meshes == 0
    alone = simulate(plan, p, window_s=3.0, min_warmup_s=1.0, cache=cache, contention="none")
    assert (cache.hits, cache.misses) == (len(plan.meshes), len(plan.meshes))
    assert alone.models == shared.models
    assert alone == simulate(plan, p, window_s=3.0, min_warmup_s=1.0, contention="none")


def test_bad_contention_or_cache() -> None:
    p, plan = light()
    with pytest.raises(ValueError, match=r"contention must be one of .* got 'fair'"):
        simulate(plan, p, window_s=1.0, contention="fair")  # type: ignore[arg-type]
    other, _ = light()
    with pytest.raises(ValueError, match="one problem's replays"):
        simulate(plan, p, window_s=1.0, cache=MeshCache(other))
