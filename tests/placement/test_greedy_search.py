"""The greedy's branching search finds what running the greedy on every mesh group finds."""

from __future__ import annotations

import random
import time

import pytest

from muxserve.errors import ConfigError
from placement.candidates import Mode, build_candidates
from placement.deadline import Deadline
from placement.greedy import solve_greedy
from placement.problem import Problem, load_problem
from tests.helpers.placement import CONFIGS, cluster, problem, spec
from tests.placement.exhaustive import greedy_over_groups


def random_problem(rng: random.Random) -> Problem:
    """3–8 models on 1–3 nodes of 2–8 GPUs, loaded to compete for meshes."""
    nodes, per_node = rng.choice([(1, 4), (2, 4), (3, 2), (2, 8), (1, 8), (3, 4)])
    specs, rates = [], []
    for _ in range(rng.randint(3, 8)):
        specs.append(spec(hidden=rng.choice([512, 1024, 2048]), layers=rng.choice([4, 8, 16])))
        rates.append(round(rng.uniform(0.5, 300.0), 2))
    try:
        return problem(specs, rates, cluster(nodes=nodes, gpus_per_node=per_node))
    except ConfigError:
        return random_problem(rng)


@pytest.mark.parametrize("seed", range(16))
def test_branching_equals_the_greedy_on_every_group(seed: int) -> None:
    p = random_problem(random.Random(seed))
    table = build_candidates(p, Mode.MUX)
    want = greedy_over_groups(p, table)
    if want is None:
        with pytest.raises(ConfigError, match="greedy: no mesh group"):
            solve_greedy(p, table, progress=None)
        return
    plan = solve_greedy(p, table, progress=None)
    assert plan.served_total == pytest.approx(want, rel=1e-9, abs=1e-9)
    used = [(m.node, g) for m in plan.meshes for g in m.gpus]
    assert len(used) == len(set(used))  # meshes sit on distinct GPUs of real nodes
    assert all(0 <= n < p.cluster.nodes and 0 <= g < p.cluster.gpus_per_node for n, g in used)


def test_paper_warm_start_is_fast() -> None:
    """The candidate table and the greedy on the paper's stressed setup (α 0.7, max rate 100):
    well under a second (the benchmark has the exact time; ~0.1 s on an idle core)."""
    p = load_problem(
        CONFIGS / "models" / "paper-19.yaml",
        CONFIGS / "clusters" / "paper-4x8-a100-80gb.yaml",
        CONFIGS / "workloads" / "paper-alpha0.7.yaml",
    )
    t0 = time.perf_counter()
    plan = solve_greedy(p, progress=None)
    assert time.perf_counter() - t0 < 3.0
    assert len(plan.models) == 19


def test_a_spent_share_returns_the_first_plan_and_a_spent_budget_says_where_it_stopped() -> None:
    p = problem([spec()] * 6, [50.0] * 6, cluster(nodes=2, gpus_per_node=4))
    table = build_candidates(p, Mode.MUX)
    share_spent = Deadline.after(60.0).fraction(0.0)
    plan = solve_greedy(p, table, progress=None, deadline=share_spent)  # its first branch
    assert len(plan.models) == 6
    spent = Deadline.after(0.0)
    with pytest.raises(ConfigError, match=r"the time limit \(0 s\) ran out while greedy: placing"):
        solve_greedy(p, table, progress=None, deadline=spent)
    with pytest.raises(ConfigError, match=r"the time limit \(0 s\) ran out while evaluating"):
        build_candidates(p, Mode.MUX, deadline=spent)
