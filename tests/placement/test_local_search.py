from __future__ import annotations

import pytest

from placement.candidates import CandidateTable, Mode, build_candidates
from placement.deadline import Deadline
from placement.decomposition import plan_by_nodes
from placement.ilp import check
from placement.local_search import improve
from placement.master import Incumbent
from placement.mesh_groups import MeshPacker
from tests.helpers.placement import cluster, problem, spec


def overloaded(nodes: int = 3) -> CandidateTable:
    """Eight models asking ten times what two GPUs a node can serve."""
    rates = [900.0, 100.0, 700.0, 300.0, 500.0, 200.0, 800.0, 400.0]
    specs = [spec(hidden=512 * (1 + k % 2), layers=4) for k in range(8)]
    return build_candidates(problem(specs, rates, cluster(nodes=nodes, gpus_per_node=2)), Mode.MUX)


def hot_together(table: CandidateTable) -> Incumbent:
    """The three hottest models on node 0, the next three on node 1: a poor split."""
    groups = [[(0, 0), (6, 0), (2, 0)], [(4, 0), (7, 0), (3, 0)], [(5, 0), (1, 0)]]
    start, cut = plan_by_nodes(table, deadline=Deadline.never(), groups=groups)
    assert start is not None and not cut
    return start


def test_re_planning_pairs_of_nodes_improves_a_poor_split() -> None:
    table = overloaded()
    start = hot_together(table)
    stats: dict[str, int] = {}
    found = improve(table, start, deadline=Deadline.never(), stats=stats)
    assert start.value == pytest.approx(2359.3860087329986, rel=1e-12)
    assert found.value == pytest.approx(2413.2748259243317, rel=1e-12)
    assert stats == {"pairs": 6, "improving pairs": 2}  # two passes over the three pairs
    p = table.problem
    packer = MeshPacker(p.cluster.nodes, p.cluster.gpus_per_node, p.mesh_sizes)
    assert check(table, found.configs, packer) is None
    assert found.value == pytest.approx(sum(c.served for c in found.configs))
    again = improve(table, start, deadline=Deadline.never())
    assert [c.key for c in again.configs] == [c.key for c in found.configs]  # deterministic


def test_one_node_or_a_passed_deadline_keeps_the_start() -> None:
    table = overloaded(nodes=1)
    start, _ = plan_by_nodes(table, deadline=Deadline.never(), groups=[[(i, 0) for i in range(8)]])
    assert start is not None
    assert improve(table, start, deadline=Deadline.never()) is start
    table = overloaded()
    start = hot_together(table)
    found = improve(table, start, deadline=Deadline.after(0.0))
    assert found.value == start.value
    assert sorted(c.key for c in found.configs) == sorted(c.key for c in start.configs)
