from __future__ import annotations

import random

import pytest
from conftest import cluster, problem, spec
from exhaustive import best_placement

from placement.candidates import Mode, build_candidates
from placement.greedy import solve_greedy
from placement.ilp import solve_ilp
from placement.ilp_solver import highs_available
from placement.problem import Problem


def random_problem(rng: random.Random) -> Problem:
    """Up to 4 models of 0.1–3.5 GiB on up to 4 GPUs of 4 GiB, loaded to make them compete."""
    nodes, per_node = rng.choice([(1, 4), (2, 2), (1, 2), (1, 3), (4, 1)])
    specs, rates = [], []
    for _ in range(rng.randint(1, 4)):
        hidden = rng.choice([512, 1024, 1536, 2048])
        layers = rng.choice([4, 8, 12, 16, 24, 28])
        specs.append(spec(hidden=hidden, layers=layers, heads=8))
        rates.append(round(rng.uniform(0.5, 60.0), 2))
    cl = cluster(nodes=nodes, gpus_per_node=per_node, levels=(0.1, 0.25, 0.5, 0.8))
    try:
        return problem(specs, rates, cl)
    except Exception:  # a model too big for the drawn cluster: draw again
        return random_problem(rng)


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
