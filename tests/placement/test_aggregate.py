from __future__ import annotations

import pytest

from placement.aggregate import Aggregate
from placement.cut_bound import Cut, start_cuts
from placement.deadline import Deadline
from placement.instance import Instance
from tests.placement.test_cut_bound import crowded_gpu


def test_the_pooled_lp_upgrades_a_fraction_of_a_model_the_mesh_cannot_hold() -> None:
    # six models at 22% (1 req/s) or 2% (0.1 req/s) of one GPU's memory: pooled, 4.4 of
    # them run large (0.2 × 4.4 + 6 × 0.02 = 1): 4.4 + 1.6 × 0.1 = 4.56 (up to the fit slack)
    agg = Aggregate(Instance.whole(crowded_gpu()))
    found = agg.solve([], "auto", Deadline.never())
    assert found is not None
    assert found.value == pytest.approx(4.56, abs=1e-6)
    assert found.meshes == pytest.approx({1: 1.0})
    large = sum(x for (_, c), x in zip(agg.cands[1], found.x[1], strict=True) if c.served == 1.0)
    assert large == pytest.approx(4.4, abs=1e-6)
    assert found.weight == dict.fromkeys(range(6), 1.0)  # no replicated model: no rate caps
    assert len(found.unit_price) == 6


def test_cuts_tighten_it_and_the_fixed_family_does_not_here() -> None:
    agg = Aggregate(Instance.whole(crowded_gpu()))
    fixed = agg.solve(start_cuts(agg.sizes), "auto", Deadline.never())
    u4 = agg.solve([Cut(1, (1.0, 0.0, 0.0, 0.0), "fs", 4.0)], "auto", Deadline.never())
    assert fixed is not None and u4 is not None
    assert fixed.value == pytest.approx(4.56, abs=1e-6)  # u^(1..3) count a 22% model as 0
    assert u4.value == pytest.approx(4.2, abs=1e-6)  # u^(4): four 25% models fill the GPU


def test_an_instance_places_its_own_units_only() -> None:
    table = crowded_gpu()
    agg = Aggregate(Instance(table, tuple(table.units[:3]), 1, {}))
    found = agg.solve([], "auto", Deadline.never())
    assert found is not None and found.value == pytest.approx(3.0, abs=1e-6)  # all large
    assert [k for k, _ in agg.cands[1]] == [0, 0, 1, 1, 2, 2]


def test_a_passed_deadline_gives_no_solution() -> None:
    agg = Aggregate(Instance.whole(crowded_gpu()))
    assert agg.solve([], "auto", Deadline.after(0.0)) is None


def test_an_instance_lists_each_models_units_in_order() -> None:
    table = crowded_gpu()
    inst = Instance(table, ((2, 0), (0, 0), (2, 1), (0, 1)), 1, {})
    assert inst.model_units == {2: [0, 2], 0: [1, 3]}
    assert Aggregate(inst).models == [2, 0]
