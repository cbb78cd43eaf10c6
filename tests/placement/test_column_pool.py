from __future__ import annotations

import random

import pytest

from placement.candidates import Mode, build_candidates
from placement.column_generation import BranchAndPrice
from placement.column_pool import ColumnPool
from placement.configurations import Config
from placement.deadline import Deadline
from placement.decomposition import deal, plan_by_deals, plan_by_nodes, pricing_groups
from placement.ilp import check
from placement.instance import Instance
from placement.mesh_groups import MeshPacker
from tests.helpers.placement import cluster, problem, spec


def crowded():
    """Eight models on 4 nodes of 2 GPUs, at rates the cluster cannot all serve: the snake
    deal leaves 128 req/s on the table that the pool of several deals partly recovers, and
    the pool's steps (re-planning nodes, pricing at its own duals) recover in full."""
    rng = random.Random(0)
    specs = [
        spec(hidden=rng.choice([512, 1024, 1536, 2048]), layers=rng.choice([4, 8, 12, 16, 24]),
             heads=8)
        for _ in range(8)
    ]  # fmt: skip
    rates = [round(rng.uniform(30, 150), 1) for _ in range(8)]
    return problem(specs, rates, cluster(nodes=4, gpus_per_node=2, levels=(0.1, 0.25, 0.5, 0.8)))


def packer(p):
    return MeshPacker(p.cluster.nodes, p.cluster.gpus_per_node, p.mesh_sizes)


def test_the_pool_keeps_each_configuration_once_in_the_order_first_found() -> None:
    table = build_candidates(crowded(), Mode.MUX)
    a = Config(1, (table.options(0, 1)[0],))
    b = Config(1, (table.options(1, 1)[0],))
    pool = ColumnPool()
    pool.add([a, b, a])
    pool.add([Config(1, (table.options(0, 1)[0],)), b])
    assert len(pool) == 2
    assert pool.configs[0] is a and pool.configs[1] is b


def test_the_pools_combination_beats_every_deal_and_is_exact_on_a_crowded_instance() -> None:
    p = crowded()
    table = build_candidates(p, Mode.MUX)
    alone = plan_by_nodes(table, deadline=Deadline.never())[0]
    assert alone is not None and alone.value == pytest.approx(717.756, abs=5e-4)
    pool = ColumnPool()
    five, cut = plan_by_deals(table, deadline=Deadline.never(), pool=pool,
                              deals=(None, 5, 3, 1, 7), steps=())  # fmt: skip
    assert not cut and five is not None
    assert five.value == pytest.approx(769.225, abs=5e-4)
    # the default: the snake deal, then its plan's nodes re-planned, the pool grown at its
    # own duals, the nodes re-planned again
    found, cut = plan_by_deals(table, deadline=Deadline.never(), pool=ColumnPool())
    assert not cut and found is not None
    assert check(table, found.configs, packer(p)) is None
    assert found.value == pytest.approx(846.156, abs=5e-4)  # the optimum, below
    assert found.value == pytest.approx(sum(c.served for c in found.configs))
    # the whole problem's optimum (branch and price, run to the end) is above: the deals
    # keep each node's models together
    exact = BranchAndPrice(Instance.whole(table)).search(
        None, deadline=Deadline.never(), tolerance=1e-9
    )
    assert exact.bound == pytest.approx(846.156, abs=5e-4)
    assert found.value <= exact.bound + 1e-9 <= p.total_rate + 1e-9


def test_the_pool_is_never_worse_than_its_start_even_when_it_keeps_few_columns() -> None:
    p = crowded()
    table = build_candidates(p, Mode.MUX)
    pool = ColumnPool()
    start = plan_by_nodes(table, deadline=Deadline.never(), groups=deal(table, 1), pool=pool)[0]
    assert start is not None
    plan_by_nodes(table, deadline=Deadline.never(), groups=deal(table, 3), pool=pool)
    few = pool.combine(table, start, deadline=Deadline.never(), columns=1)
    assert few is not None and few.value >= start.value - 1e-9
    assert check(table, few.configs, packer(p)) is None


def test_growing_the_pool_at_its_own_duals_adds_columns_and_never_loses() -> None:
    p = crowded()
    table = build_candidates(p, Mode.MUX)
    pool = ColumnPool()
    start = plan_by_nodes(table, deadline=Deadline.never(), pool=pool)[0]
    assert start is not None
    before = pool.combine(table, start, deadline=Deadline.never())
    assert before is not None
    size, stats = len(pool), {}
    groups = pricing_groups(table, before)
    cut = pool.grow(table, groups, deadline=Deadline.never(), stats=stats)
    assert not cut and (size, len(pool)) == (44, 106) and stats == {"pool rounds": 2}
    after = pool.combine(table, before, deadline=Deadline.never())
    assert after is not None and after.value == pytest.approx(837.825, abs=5e-4)
    assert after.value >= before.value - 1e-9
    assert check(table, after.configs, packer(p)) is None


def test_pricing_groups_are_every_deals_node_groups_then_the_plans_nodes_each_once() -> None:
    table = build_candidates(crowded(), Mode.MUX)
    plan = plan_by_nodes(table, deadline=Deadline.never())[0]
    assert plan is not None
    groups = pricing_groups(table, plan)
    assert groups[:4] == [sorted(i for i, _ in g) for g in deal(table)]
    # the snake and shifts 0-3 deal 20 groups of which 16 differ; the
    # plan is the snake deal's, so its nodes add no group
    assert len(groups) == len({tuple(g) for g in groups}) == 16
    assert sorted(i for g in groups[:4] for i in g) == list(range(8))


def test_replanning_a_plans_nodes_from_their_meshes_is_never_worse() -> None:
    table = build_candidates(crowded(), Mode.MUX)
    pool = ColumnPool()
    start = plan_by_nodes(table, deadline=Deadline.never(), groups=deal(table, 3), pool=pool)[0]
    assert start is not None
    found, _ = plan_by_deals(table, deadline=Deadline.never(), pool=pool, deals=(3,),
                             steps=("replan",))  # fmt: skip
    assert found is not None and found.value >= start.value - 1e-9
    assert (start.value, found.value) == (pytest.approx(692.882, abs=5e-4),
                                          pytest.approx(747.444, abs=5e-4))  # fmt: skip


def test_an_unknown_step_is_refused_by_name() -> None:
    table = build_candidates(crowded(), Mode.MUX)
    with pytest.raises(ValueError, match="unknown step 'polish'"):
        plan_by_deals(table, deadline=Deadline.never(), pool=ColumnPool(), steps=("polish",))


def test_deals_shift_each_round_of_the_rate_order() -> None:
    table = build_candidates(crowded(), Mode.MUX)
    p = table.problem
    order = sorted(range(8), key=lambda i: (-p.targets[i].rate, i))
    groups = deal(table, 1)
    # round 0: nodes 0-3; round 1: shifted by one node
    assert groups == [
        [(order[0], 0), (order[7], 0)],
        [(order[1], 0), (order[4], 0)],
        [(order[2], 0), (order[5], 0)],
        [(order[3], 0), (order[6], 0)],
    ]


def test_the_pooled_plan_is_the_same_run_to_run() -> None:
    table = build_candidates(crowded(), Mode.MUX)
    plans = [plan_by_deals(table, deadline=Deadline.never(), pool=ColumnPool())[0]
             for _ in range(2)]  # fmt: skip
    keys = [sorted(c.key for c in found.configs) for found in plans if found is not None]
    assert len(keys) == 2 and keys[0] == keys[1]
