"""Replicas: a model its smallest mesh cannot serve may be placed on several meshes."""

from __future__ import annotations

from pathlib import Path

import pytest

from muxserve.config import dump_config, load_config
from placement.algorithms import SolveOptions, solve
from placement.candidates import Mode, build_candidates
from placement.plan import to_config
from placement.problem import Problem
from placement.simulator import _split_arrivals, simulate
from tests.helpers.placement import cluster, problem, spec


def hot() -> Problem:
    """One very hot model and two light ones on one node of 4 GPUs."""
    return problem(
        [spec(hidden=1024, layers=8), spec(), spec()],
        [400.0, 2.0, 3.0],
        cluster(nodes=1, gpus_per_node=4),
    )


def test_only_a_model_its_smallest_mesh_cannot_serve_gets_replicas() -> None:
    p = hot()
    assert [build_candidates(p, Mode.MUX).replicas(i) for i in range(3)] == [1, 1, 1]
    table = build_candidates(p, Mode.MUX, max_replicas=4)
    alone = max(c.served for c in table.options(0, 1) if table.fits([c]))
    assert alone < 400.0 <= 2 * alone  # two meshes of one GPU serve it: two replicas
    assert [table.replicas(i) for i in range(3)] == [2, 1, 1]
    assert table.units == [(0, 0), (0, 1), (1, 0), (2, 0)]


def test_replicas_raise_what_a_hot_model_is_served() -> None:
    p = hot()
    one = solve(p, ("ilp", "greedy"), SolveOptions(time_limit=30), progress=None)
    many = solve(p, ("ilp", "greedy"), SolveOptions(time_limit=30, max_replicas=4), progress=None)
    assert one["ilp"].status == many["ilp"].status == "optimal"
    assert [m.replica for m in one["ilp"].models] == [0, 0, 0]
    ilp = many["ilp"]
    assert ilp.served_total > one["ilp"].served_total * 1.15
    assert many["greedy"].served_total > one["greedy"].served_total
    for plan in many.values():
        replicas = plan.replicas("m0")
        assert [m.replica for m in replicas] == [0, 1]
        assert len({id(mesh) for mesh in plan.meshes for m in mesh.models if m.name == "m0"}) == 2
        assert sum(m.served for m in replicas) == pytest.approx(plan.served()["m0"])
        assert plan.served()["m0"] <= 400.0 + 1e-6
        assert plan.served()["m1"] == 2.0 and plan.served()["m2"] == 3.0
        assert plan.requested_total == 405.0
        assert plan.bound is None or plan.bound <= 405.0


def test_replicas_round_trip_through_the_serving_config(tmp_path: Path) -> None:
    p = hot()
    plan = solve(p, ("ilp",), SolveOptions(time_limit=30, max_replicas=4), progress=None)["ilp"]
    cfg = to_config(plan, p)
    dump_config(cfg, tmp_path / "plan.yaml")
    back = load_config(tmp_path / "plan.yaml")
    assert back == cfg
    assert [m.name for m in back.models] == ["m0", "m1", "m2"]  # each model listed once
    assert back.meshes is not None
    hosting = [mesh for mesh in back.meshes if any(m.name == "m0" for m in mesh.models)]
    assert len(hosting) == 2
    planned = sorted(round(m.served, 4) for m in plan.replicas("m0"))
    rates = sorted(m.rate for mesh in hosting for m in mesh.models if m.name == "m0")
    assert rates == planned  # each replica carries the rate the plan expects it to serve
    for mesh in hosting:  # each mesh's engine gets its replica's degree, shares and rate
        (entry,) = [m for m in back.for_mesh(mesh).models if m.name == "m0"]
        (mm,) = [m for m in mesh.models if m.name == "m0"]
        assert (entry.rate, entry.tensor_parallel) == (mm.rate, len(mesh.gpus))


def test_the_simulator_splits_arrivals_by_planned_rate() -> None:
    p = hot()
    plan = solve(p, ("ilp",), SolveOptions(time_limit=30, max_replicas=4), progress=None)["ilp"]
    windows = [(5.0, 65.0)] * len(plan.meshes)
    arrivals = _split_arrivals(plan, p, windows, [{}] * len(windows), seed=0, admission=False)
    counts = [sum(1 for _, name, _ in mesh if name == "m0") for mesh in arrivals]
    served = [sum(m.served for m in mesh.models if m.name == "m0") for mesh in plan.meshes]
    total = sum(counts)
    assert total == pytest.approx(400.0 * 65.0, rel=0.02)  # the model's one Poisson stream
    for n, s in zip(counts, served, strict=True):
        assert n / total == pytest.approx(s / sum(served), abs=0.02)
    sim = simulate(plan, p, window_s=10.0, min_warmup_s=2.0)
    assert [m.name for m in sim.models] == ["m0", "m1", "m2"]  # one row per model
    (m0,) = [m for m in sim.models if m.name == "m0"]
    assert m0.throughput == pytest.approx(plan.served()["m0"], rel=0.2)
