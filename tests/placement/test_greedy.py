from __future__ import annotations

import pytest

from muxserve.errors import ConfigError
from placement.candidates import Mode, build_candidates
from placement.greedy import solve_greedy, solve_temporal
from tests.helpers.placement import cluster, problem, spec


def test_light_load_serves_everyone_on_the_smallest_meshes() -> None:
    p = problem([spec(), spec(), spec()], [1.0, 2.0, 3.0], cluster(nodes=1, gpus_per_node=4))
    plan = solve_greedy(p, progress=None)
    assert plan.served_total == pytest.approx(6.0)
    assert plan.under_served() == []
    assert plan.status == "heuristic"
    assert sorted(m.name for m in plan.models) == ["m0", "m1", "m2"]
    # the paper's share: the least decode share whose capacity meets the rate
    table = build_candidates(p, Mode.MUX)
    for m in plan.models:
        i = p.index(m.name)
        meeting = [c.share for c in table.options(i, m.tensor_parallel) if c.served >= m.rate]
        assert m.decode_share == min(meeting)


def test_greedy_gives_up_where_the_ilp_does_not() -> None:
    # the greedy fixes each model's share before placing it and runs out of room for the
    # last one; the ILP serves everyone, some in part (found by a random search)
    from placement.ilp import solve_ilp

    specs = [
        spec(hidden=512, layers=24),
        spec(hidden=1536, layers=4),
        spec(hidden=512, layers=8),
        spec(hidden=2048, layers=16),
    ]
    p = problem(specs, [50.0, 1.0, 50.0, 50.0], cluster(nodes=1, gpus_per_node=1))
    with pytest.raises(ConfigError, match="greedy: no mesh group"):
        solve_greedy(p, progress=None)
    plan = solve_ilp(p, progress=None, gap_tolerance=0.0)
    assert len(plan.models) == 4
    assert plan.under_served() and plan.served_total == pytest.approx(88.5, abs=0.05)


def test_no_group_holds_everyone() -> None:
    big = spec(hidden=2048, layers=24)  # ~3 GiB: one per 4 GiB GPU
    p = problem([big, big, big], [1.0, 1.0, 1.0], cluster(nodes=1, gpus_per_node=2))
    with pytest.raises(ConfigError, match="greedy: no mesh group of the cluster can host all 3"):
        solve_greedy(p, progress=None)


def test_progress_is_reported_on_long_searches() -> None:
    p = problem([spec(), spec()], [1.0, 1.0], cluster(nodes=2, gpus_per_node=8))
    lines: list[str] = []
    solve_greedy(p, progress=lines.append, progress_after_s=0.0)
    assert lines == [] or lines[0].startswith("greedy: ")


def test_temporal_runs_one_job_at_a_time() -> None:
    p = problem([spec(), spec()], [1.0, 1.0])
    plan = solve_temporal(p, progress=None)
    assert plan.mode is Mode.TEMPORAL
    for m in plan.models:
        assert (m.prefill_share, m.decode_share) == (1.0, 1.0)
        assert m.time_share is not None
