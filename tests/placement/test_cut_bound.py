from __future__ import annotations

import random

import numpy as np
import pytest

from placement.candidates import Candidate, CandidateTable, Capacity, Mode, build_candidates
from placement.column_generation import BranchAndPrice
from placement.cut_bound import Round, cut_bound, dff, start_cuts, weight_grid
from placement.deadline import Deadline
from placement.ilp import solve_ilp
from placement.instance import Instance
from placement.lp import highs_available
from tests.helpers.placement import cluster, problem, random_problem, spec
from tests.placement.exhaustive import best_placement


def crowded_gpu() -> CandidateTable:
    """Six models on one GPU, each at 22% of its memory serving 1 req/s, or at 2% serving
    0.1: at most four fit large (5 × 0.22 > 1), so the optimum is 4 × 1 + 2 × 0.1 = 4.2.
    The pooled LP upgrades 0.88 / 0.2 = 4.4 of them (4.56); u^(1..3) of any weight mix
    count a 0.22 item as 0, only u^(4) (0.25 each) sees that four is the most."""
    p = problem([spec(f"m{i}") for i in range(6)], [1.0] * 6, cluster(nodes=1, gpus_per_node=1))
    assert p.mesh_sizes == (1,)

    def cand(i: int, memory: float, served: float) -> Candidate:
        return Candidate(i, 1, 0.1, served, 1.0, 0.01, 0.01, 0.0, (memory, 0.0, 0.0, 0.0))

    options = {(i, 1): (cand(i, 0.22, 1.0), cand(i, 0.02, 0.1)) for i in range(6)}
    return CandidateTable(p, Mode.MUX, Capacity(1.0, 1.0, 1.0, 1.0), options)


def test_separated_cuts_close_a_gap_the_fixed_family_leaves_on_a_hand_made_instance() -> None:
    table = crowded_gpu()
    fixed = BranchAndPrice(Instance.whole(table)).aggregate()
    assert fixed is not None and fixed.value == pytest.approx(4.56, abs=1e-6)
    found = cut_bound(table)
    assert found is not None
    assert found.value == pytest.approx(4.2, abs=1e-6)
    assert found.rounds == 1  # one round of separation, then nothing is violated
    assert found.cuts == len(start_cuts((1,))) + 1  # u^(4) of the memory alone


@pytest.mark.parametrize("seed", range(8))
def test_the_bound_is_at_least_the_optimum_and_at_most_the_fixed_familys(seed: int) -> None:
    p = random_problem(random.Random(seed))
    exact = best_placement(p, build_candidates(p, Mode.MUX, prune=False))
    if exact == float("-inf"):
        pytest.skip("no placement holds every model")
    table = build_candidates(p, Mode.MUX)
    found = cut_bound(table)
    fixed = BranchAndPrice(Instance.whole(table)).aggregate()
    assert found is not None and fixed is not None
    assert found.value >= exact - 1e-7
    assert found.value <= fixed.value + 1e-6


@pytest.mark.skipif(not highs_available(), reason="needs highspy")
def test_both_backends_give_the_same_bound() -> None:
    table = crowded_gpu()
    a, b = cut_bound(table, backend="highs"), cut_bound(table, backend="cbc")
    assert a is not None and b is not None
    assert a.value == pytest.approx(b.value, abs=1e-6)


def test_a_passed_deadline_gives_no_bound() -> None:
    assert cut_bound(crowded_gpu(), deadline=Deadline.after(0.0)) is None


@pytest.mark.parametrize("seed", range(20))
def test_dual_feasible_functions_keep_sums_within_one(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.dirichlet(np.ones(int(rng.integers(1, 8)))) * rng.uniform(0.5, 1.0)
    for k in range(1, 11):
        assert dff("fs", k, x).sum() <= 1.0 + 1e-12
    for lam in (0.1, 0.25, 0.5):
        assert dff("f0", lam, x).sum() <= 1.0 + 1e-12


@pytest.mark.parametrize("x", [0.0, 0.2, 1 / 3, 0.4, 0.5, 0.51, 2 / 3, 0.8, 1.0])
def test_dual_feasible_functions(x: float) -> None:
    # u^(k)(x) + u^(k)(1 - x) <= 1: items filling a mesh never count for more than one mesh
    def u(k: int, x: float) -> float:  # Fekete and Schepers' u^(k), the fixed family's
        return float(dff("fs", float(k), np.array(x)))

    for k in (1, 2, 3):
        assert 0.0 <= u(k, x) <= 1.0
        assert u(k, x) + u(k, 1.0 - x) <= 1.0 + 1e-12
    assert [u(1, x) for x in (0.3, 0.5, 0.6)] == [0.0, 0.5, 1.0]


def test_dual_feasible_function_values() -> None:
    x = np.array([0.1, 0.22, 0.3, 0.5, 0.6, 0.85])
    assert dff("fs", 1, x).tolist() == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
    assert dff("fs", 4, x).tolist() == pytest.approx([0.0, 0.25, 0.25, 0.5, 0.6, 1.0])
    assert dff("f0", 0.2, x).tolist() == [0.0, 0.22, 0.3, 0.5, 0.6, 1.0]


def test_bad_dual_feasible_functions_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown dual feasible function 'ccm'"):
        dff("ccm", 1, np.zeros(1))
    with pytest.raises(ValueError, match=r"f0 needs 0 < lambda <= 1/2, got 0\.6"):
        dff("f0", 0.6, np.zeros(1))


def test_the_weight_grid_is_the_simplex_in_a_fixed_order() -> None:
    grid = weight_grid(2)
    assert len(grid) == 10 and len(weight_grid()) == 84
    assert grid[0] == (0.0, 0.0, 0.0, 1.0) and grid[-1] == (1.0, 0.0, 0.0, 0.0)
    assert all(sum(w) == pytest.approx(1.0) and min(w) >= 0 for w in grid)


def test_with_replicas_the_bound_is_at_least_the_optimal_plan() -> None:
    # one hot model two single-GPU meshes serve (two replicas) and two light ones, 4 GPUs
    p = problem(
        [spec(hidden=1024, layers=8), spec(), spec()],
        [400.0, 2.0, 3.0],
        cluster(nodes=1, gpus_per_node=4),
    )
    table = build_candidates(p, Mode.MUX, max_replicas=4)
    assert table.units == [(0, 0), (0, 1), (1, 0), (2, 0)]
    plan = solve_ilp(p, table, gap_tolerance=0.0, progress=None, time_limit=60)
    assert plan.status == "optimal"
    found = cut_bound(table)
    fixed = BranchAndPrice(Instance.whole(table)).aggregate()
    assert found is not None and fixed is not None
    assert plan.served_total - 1e-7 <= found.value <= fixed.value + 1e-6
    assert found.value <= p.total_rate + 1e-9


@pytest.mark.skipif(not highs_available(), reason="needs highspy")
def test_the_interior_point_method_gives_the_same_bound_and_every_round_is_seen() -> None:
    rounds: list[Round] = []
    found = cut_bound(crowded_gpu(), solver="ipm", on_round=rounds.append)
    assert found is not None and found.value == pytest.approx(4.2, abs=1e-6)
    assert [r.solution.value for r in rounds] == pytest.approx([4.56, 4.2], abs=1e-6)
    assert [(r.cuts, r.added, r.support) for r in rounds] == [
        (len(start_cuts((1,))), 1, {}),
        (len(start_cuts((1,))) + 1, 0, {}),
    ]
