from __future__ import annotations

import pytest

from placement.configurations import Config
from placement.deadline import Deadline
from placement.instance import Instance
from placement.master import Branch, Master, MasterLP, split
from tests.placement.test_cut_bound import crowded_gpu


def crowded_master() -> tuple[Master, Config, Config]:
    """One GPU, six models: every model small (0.6 req/s) or four large and two small (4.2)."""
    table = crowded_gpu()
    large, small = zip(*(table.options(i, 1) for i in range(6)), strict=True)
    all_small = Config(1, small)
    best = Config(1, (*large[:4], *small[4:]))
    master = Master(Instance.whole(table), threads=None, backend="auto")
    assert master.add(all_small) and master.add(best)
    return master, all_small, best


def test_a_configuration_is_one_column_once() -> None:
    master, all_small, best = crowded_master()
    assert not master.add(Config(1, best.cands))  # the same key
    assert master.configs == [all_small, best]
    assert len(master.config_cols) == 2


def test_the_lp_and_the_integer_master_pick_the_best_configuration() -> None:
    master, _, best = crowded_master()
    solved = master.lp(Branch(), Deadline.never())
    assert solved is not None
    lp, unit_price, weight, size_price = solved
    assert lp.value == pytest.approx(4.2)
    assert lp.counts == pytest.approx({1: 1.0}) and lp.artificial == pytest.approx(0.0)
    assert weight == dict.fromkeys(range(6), 1.0)  # no replicated model
    assert len(unit_price) == 6 and set(size_price) == {1}
    found = master.integer(Branch(), None, Deadline.never())
    assert found is not None
    assert found.value == pytest.approx(4.2) and found.configs == [best]


def test_a_branch_that_forbids_every_column_leaves_the_lp_the_artificial_ones() -> None:
    master, _, _ = crowded_master()
    solved = master.lp(Branch(forbid=frozenset({(0, 1)})), Deadline.never())
    assert solved is not None
    assert solved[0].value == pytest.approx(0.0)
    assert solved[0].artificial == pytest.approx(6.0)  # no model placed
    assert master.integer(Branch(forbid=frozenset({(0, 1)})), None, Deadline.never()) is None


def test_split_on_a_fractional_mesh_count_then_on_a_fractional_presence() -> None:
    lp = MasterLP(1.0, {1: 1.5, 2: 1.0}, {}, 0.0)
    down, up = split(Branch(), lp, (1, 2), {})
    assert down == Branch(hi=((1, 1),)) and up == Branch(lo=((1, 2),))
    lp = MasterLP(1.0, {1: 1.0, 2: 1.0}, {(3, 1): 0.5, (4, 2): 1.0}, 0.0)
    never, only = split(Branch(), lp, (1, 2), {})
    assert never == Branch(forbid=frozenset({(3, 1)}))
    assert only == Branch(forbid=frozenset({(3, 2)}))
    assert split(Branch(), lp, (1, 2), {3: 5.0}) == []  # a replicated model is not branched on
