from __future__ import annotations

import random

import pytest

import placement.ilp as ilp_module
from placement.candidates import Mode, build_candidates
from placement.column_generation import BranchAndPrice
from placement.deadline import Deadline
from placement.decomposition import deal, plan_by_nodes
from placement.ilp import check, solve_ilp
from placement.instance import Instance
from placement.mesh_groups import MeshPacker
from tests.helpers.placement import cluster, problem, random_problem, spec
from tests.placement.exhaustive import best_placement


def eight_models():
    rates = [9.0, 1.0, 7.0, 3.0, 5.0, 2.0, 8.0, 4.0]
    specs = [spec(hidden=512 * (1 + k % 2), layers=4) for k in range(8)]
    return problem(specs, rates, cluster(nodes=3, gpus_per_node=2))


def test_models_are_dealt_out_in_snake_order_of_rate() -> None:
    p = eight_models()
    groups = deal(build_candidates(p, Mode.MUX))
    # by rate: m0 9, m6 8, m2 7, m4 5, m7 4, m3 3, m5 2, m1 1 -> nodes 0 1 2 2 1 0 0 1
    assert groups == [[(0, 0), (3, 0), (5, 0)], [(6, 0), (7, 0), (1, 0)], [(2, 0), (4, 0)]]


def test_node_by_node_plan_is_feasible_and_each_node_holds_its_models() -> None:
    p = eight_models()
    table = build_candidates(p, Mode.MUX)
    found, cut = plan_by_nodes(table, deadline=Deadline.never(), backend="auto")
    assert found is not None and not cut
    packer = MeshPacker(p.cluster.nodes, p.cluster.gpus_per_node, p.mesh_sizes)
    assert check(table, found.configs, packer) is None
    assert found.value == pytest.approx(sum(c.served for c in found.configs))


@pytest.mark.parametrize("seed", range(8))
def test_aggregate_bound_with_cuts_bounds_the_optimum(seed: int) -> None:
    p = random_problem(random.Random(seed))
    exact = best_placement(p, build_candidates(p, Mode.MUX, prune=False))
    if exact == float("-inf"):
        pytest.skip("no placement holds every model")
    found = BranchAndPrice(Instance.whole(build_candidates(p, Mode.MUX))).aggregate()
    assert found is not None and found.value >= exact - 1e-7


def test_at_scale_the_ilp_plans_by_nodes_and_notes_nothing_cut(monkeypatch) -> None:
    monkeypatch.setattr(ilp_module, "SCALE_NODES", 2)
    monkeypatch.setattr(ilp_module, "SCALE_UNITS", 4)
    p = eight_models()
    plan = solve_ilp(p, progress=None, time_limit=120)
    table = build_candidates(p, Mode.MUX)
    assert plan.bound is not None and plan.served_total <= plan.bound + 1e-9
    assert plan.bound <= p.total_rate + 1e-9
    assert plan.served_total == pytest.approx(39.0)  # every model served in full
    assert not any("time limit cut" in n for n in plan.notes)
    again = solve_ilp(p, progress=None, time_limit=120)
    assert [(m.name, m.tensor_parallel, m.decode_share, m.served) for m in again.models] == [
        (m.name, m.tensor_parallel, m.decode_share, m.served) for m in plan.models
    ]
    assert len(table.units) == 8


def test_a_plan_the_deadline_cut_says_so_and_the_work_is_noted(monkeypatch) -> None:
    monkeypatch.setattr(ilp_module, "SCALE_NODES", 2)
    monkeypatch.setattr(ilp_module, "SCALE_UNITS", 4)
    real = ilp_module.plan_by_deals

    def cut_short(*args, **kwargs):
        found, _ = real(*args, **kwargs)
        return found, True  # as if the deadline had stopped a node's search

    monkeypatch.setattr(ilp_module, "plan_by_deals", cut_short)
    plan = solve_ilp(eight_models(), progress=None, time_limit=120)
    # the snake deal's 3 nodes, then the plan's 3 nodes re-planned twice (`STEPS`)
    assert any(n.startswith("work: 9 node searches, ") for n in plan.notes)
    assert any(
        n.startswith("the time limit cut the node-by-node plan short: this plan depends on the CPU")
        for n in plan.notes
    )
