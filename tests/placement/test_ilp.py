from __future__ import annotations

import random

import pytest

from placement.candidates import Mode, build_candidates
from placement.greedy import solve_greedy
from placement.ilp import solve_ilp
from placement.ilp_solver import highs_available
from placement.problem import Problem
from tests.helpers.placement import cluster, problem, random_problem, spec
from tests.placement.exhaustive import best_placement


@pytest.mark.parametrize("seed", range(12))
def test_ilp_equals_exhaustive_enumeration(seed: int) -> None:
    p = random_problem(random.Random(seed))
    exact = best_placement(p, build_candidates(p, Mode.MUX, prune=False))
    if exact == float("-inf"):
        pytest.skip("no placement holds every model")
    plan = solve_ilp(p, gap_tolerance=0.0, progress=None, time_limit=60)
    assert plan.served_total == pytest.approx(exact, rel=1e-7, abs=1e-9)
    assert plan.status == "optimal" and plan.gap == pytest.approx(0.0, abs=1e-6)


def test_ilp_is_at_least_the_greedy_on_the_paper_setup(paper_problem: Problem) -> None:
    table = build_candidates(paper_problem, Mode.MUX)
    greedy = solve_greedy(paper_problem, table, progress=None)
    ilp = solve_ilp(paper_problem, table, warm_start=greedy, progress=None, time_limit=30)
    assert ilp.served_total >= greedy.served_total - 1e-9
    assert ilp.gap is not None and ilp.gap <= 1e-3
    assert ilp.solve_time_s < 10


def test_overload_serves_the_most_and_names_the_rest() -> None:
    p = problem(
        [spec(hidden=1024, layers=8), spec(hidden=1024, layers=8)],
        [5000.0, 1.0],
        cluster(nodes=1, gpus_per_node=2),
    )
    plan = solve_ilp(p, gap_tolerance=0.0, progress=None)
    short = plan.under_served()
    assert [m.name for m in short] == ["m0"]
    assert plan.served()["m1"] == 1.0
    assert 0 < short[0].served < 5000.0


def test_fairness_objective_raises_the_least_served_ratio() -> None:
    specs = [spec(hidden=1024, layers=8) for _ in range(3)]
    p = problem(specs, [400.0, 400.0, 40.0], cluster(nodes=1, gpus_per_node=1))
    fair = solve_ilp(p, objective="fair", progress=None, gap_tolerance=0.0)
    most = solve_ilp(p, objective="throughput", progress=None, gap_tolerance=0.0)
    assert fair.fairness() >= most.fairness() - 1e-9
    assert most.served_total >= fair.served_total - 1e-9


def test_every_model_is_placed_once() -> None:
    p = random_problem(random.Random(3))
    plan = solve_ilp(p, progress=None)
    assert sorted(m.name for m in plan.models) == sorted(s.name for s in p.specs)


@pytest.mark.skipif(not highs_available(), reason="highspy is not installed")
def test_highs_gives_the_same_optimum() -> None:
    p = random_problem(random.Random(5))
    cbc = solve_ilp(p, gap_tolerance=0.0, progress=None)
    highs = solve_ilp(p, gap_tolerance=0.0, progress=None, solver="highs")
    assert highs.served_total == pytest.approx(cbc.served_total, rel=1e-7)


def test_unknown_solver() -> None:
    from muxserve.errors import ConfigError

    p = random_problem(random.Random(0))
    with pytest.raises(ConfigError, match="unknown solver 'gurobi'"):
        solve_ilp(p, solver="gurobi", progress=None, gap_tolerance=0.0)


def paper_setup(workload: str = "paper-alpha0.9.yaml") -> Problem:
    from placement.problem import load_problem
    from tests.helpers.placement import CONFIGS

    return load_problem(
        CONFIGS / "models" / "paper-19.yaml",
        CONFIGS / "clusters" / "paper-4x8-a100-80gb.yaml",
        CONFIGS / "workloads" / workload,
    )


def test_an_undecodable_solution_is_dropped_with_a_note_and_the_best_kept() -> None:
    # the crash of issue 14: a time-limited compact solution opened more meshes of a size than
    # the node patterns provide; such a solution must never become the plan
    from placement.configurations import Config
    from placement.deadline import Deadline
    from placement.ilp import _configs, _Run, check

    p = problem([spec(), spec(), spec()], [5.0, 5.0, 5.0], cluster(nodes=1, gpus_per_node=2))
    table = build_candidates(p, Mode.MUX)
    greedy = solve_greedy(p, table, progress=None)
    run = _Run(p, table, "cbc", None, None, Deadline.after(10))
    assert run.offer(_configs(p, table, greedy), "the warm start")
    alone = [Config(1, (table.options(i, 1)[0],)) for i in range(3)]  # three 1-GPU meshes
    assert check(table, alone, run.packer) == "meshes of [1, 1, 1] GPUs do not fit on the nodes"
    assert not run.offer(alone, "the compact program's solution")
    assert run.best == _configs(p, table, greedy)
    assert run.notes == [
        "the compact program's solution did not decode into a feasible plan (meshes of "
        "[1, 1, 1] GPUs do not fit on the nodes); kept the best"
    ]
    twice = [Config(2, (table.options(0, 2)[0], table.options(0, 2)[-1]))]
    assert check(table, twice, run.packer) == "mesh 0 hosts a model twice"
    missing = [Config(2, (table.options(0, 2)[-1],))]
    assert check(table, missing, run.packer) == "m1 is placed 0 times"


def test_tiny_time_limits_never_crash_nor_lose_the_warm_start() -> None:
    """The 64-model, 64-GPU instance of the benchmark, 0.2–3 s of search after the warm start:
    a feasible plan at least as good as the greedy's, a bound at or below the requested total,
    and the limit kept (generously here; the benchmark measures the overshoot)."""
    import sys
    import time

    from placement.ilp import check
    from placement.mesh_groups import MeshPacker
    from tests.helpers.placement import ROOT

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_placement import large_problem

    p = large_problem(0.7, 100.0, 8.0)
    table = build_candidates(p, Mode.MUX)
    greedy = solve_greedy(p, table, progress=None)
    packer = MeshPacker(8, 8, p.mesh_sizes)
    for limit in (0.2, 1.0, 3.0):
        t0 = time.perf_counter()
        plan = solve_ilp(p, table, warm_start=greedy, time_limit=limit, progress=None)
        wall = time.perf_counter() - t0
        assert wall < limit * 1.5 + 1.0, (limit, wall)
        assert plan.served_total >= greedy.served_total - 1e-9
        assert sorted(m.name for m in plan.models) == sorted(s.name for s in p.specs)
        from placement.ilp import _configs

        assert check(table, _configs(p, table, plan), packer) is None
        assert plan.bound is not None and plan.gap is not None
        assert plan.served_total - 1e-6 <= plan.bound <= p.total_rate + 1e-6


def test_the_bound_never_exceeds_what_the_models_can_serve() -> None:
    # m0 asks for far more than any mesh serves: the bound is capped by what m0 can serve
    from placement.ilp import cap_bound

    p = problem(
        [spec(hidden=1024, layers=8), spec(hidden=1024, layers=8)],
        [5000.0, 1.0],
        cluster(nodes=1, gpus_per_node=2),
    )
    table = build_candidates(p, Mode.MUX)
    most = max(c.served for s in table.sizes(0) for c in table.options(0, s))
    assert cap_bound(table) == pytest.approx(most + 1.0)
    for limit in (0.05, 30.0):
        plan = solve_ilp(p, table, time_limit=limit, progress=None)
        assert plan.bound is not None
        assert plan.served_total - 1e-9 <= plan.bound <= most + 1.0 + 1e-9 < p.total_rate


def test_a_mid_size_plan_keeps_its_time_limit() -> None:
    """The paper's 19 models at 2.5x their rates with a 2 s limit for everything."""
    import time

    from placement.algorithms import SolveOptions, solve

    p = paper_setup("paper-alpha0.7.yaml")
    p = problem_with_rates(p, 2.5)
    t0 = time.perf_counter()
    plans = solve(p, ("ilp",), SolveOptions(time_limit=2.0), progress=None)
    wall = time.perf_counter() - t0
    assert wall < 2.0 * 1.5 + 0.5, wall
    assert plans["ilp"].bound is not None and plans["ilp"].bound <= p.total_rate + 1e-6


def problem_with_rates(p: Problem, scale: float) -> Problem:
    from dataclasses import replace

    targets = tuple(replace(t, rate=t.rate * scale) for t in p.targets)
    return replace(p, targets=targets)
