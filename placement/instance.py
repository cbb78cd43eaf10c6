"""What one search places: units of a candidate table on some nodes of the problem's shape.

The whole problem is one instance; the node-by-node plan (`decomposition`) and the local
search (`local_search`) make small ones — a node's dealt models on that node, the models of
two nodes on those two — so that the same branch and price, and the same aggregate LP, serve
them all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from placement.candidates import CandidateTable


@dataclass(frozen=True)
class Instance:
    """Units of a candidate table to place on `nodes` nodes of the problem's shape."""

    table: CandidateTable
    units: tuple[tuple[int, int], ...]  # (model, replica)
    nodes: int
    caps: Mapping[int, float]  # per replicated model: the most its units here serve in all

    @classmethod
    def whole(cls, table: CandidateTable) -> Instance:
        """Every unit of the table on every node."""
        p = table.problem
        caps = {i: p.targets[i].rate for i in range(p.num_models) if table.replicas(i) > 1}
        return cls(table, tuple(table.units), p.cluster.nodes, caps)

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.table.problem.mesh_sizes

    @property
    def model_units(self) -> dict[int, list[int]]:
        """Per model here (in the order of its first unit): the indices of its units."""
        out: dict[int, list[int]] = {}
        for k, (i, _) in enumerate(self.units):
            out.setdefault(i, []).append(k)
        return out

    def mandatory(self, k: int) -> bool:
        """Unit k is a model's replica 0: it must be placed."""
        return self.units[k][1] == 0
