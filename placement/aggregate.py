"""The aggregate LP: each unit's candidates with the resources of all meshes of a size pooled.

It lets items share a mesh they cannot share, so it is a relaxation of every placement: its
optimum bounds the total served rate from above, in a fraction of a second where the
configuration LP's pricing takes minutes. Valid cuts (`cut_bound`: dual feasible functions of
the candidates' shares of a mesh) tighten it; this module only writes the program, for a
given list of cuts, and reads back what its two users need: the candidates' weights and the
meshes per size (to separate more cuts, `cut_bound`), and the duals of the unit and rate rows
(a point to steer pricing from, `column_generation`).

The rows: each unit at most once (replica 0 exactly once), each replicated model's rate cap,
per size and resource the pooled capacity, one row per cut, and the number of nodes. A
column per node pattern supplies p.count(s) meshes of each size s; a column per (unit,
candidate) uses its shares and its cuts' values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from placement.candidates import Candidate
from placement.candidates import room as fit_room
from placement.deadline import Deadline
from placement.instance import Instance
from placement.lp import Program
from placement.mesh_groups import node_patterns


class AggregateCut(Protocol):
    """A valid row Σ value(share) over a size's placed candidates ≤ its meshes."""

    @property
    def size(self) -> int: ...

    def values(self, shares: np.ndarray) -> np.ndarray:
        """The row's coefficient for each row of `shares` (n, 4)."""
        ...


@dataclass(frozen=True)
class AggregateSolution:
    """An optimal solution of the aggregate LP."""

    value: float  # an upper bound on every placement's total served rate
    x: dict[int, np.ndarray]  # per size: each candidate's weight, in `Aggregate.cands` order
    meshes: dict[int, float]  # per size: meshes of that size in the solution
    unit_price: list[float]  # per unit: its row's dual (an optional unit's at least 0)
    weight: dict[int, float]  # per model of the instance: 1 less its rate cap's dual


class Aggregate:
    """The aggregate LP's data for one instance: per size, each unit's candidates and their
    shares of a mesh (a fitting mesh's shares add up to at most 1 per resource)."""

    def __init__(self, instance: Instance) -> None:
        self.inst = instance
        table = self.table = instance.table
        p = table.problem
        self.sizes = instance.sizes
        self.patterns = node_patterns(p.cluster.gpus_per_node, p.mesh_sizes)
        # a mesh fits with Σ use ≤ cap·(1 + ε) + ε (`candidates.fits`)
        room = np.array(fit_room(table.capacity))
        self.models = list(instance.model_units)
        # per size: (unit index, candidate) and their shares (n, 4)
        self.cands: dict[int, list[tuple[int, Candidate]]] = {s: [] for s in self.sizes}
        for k, (i, j) in enumerate(instance.units):
            for s in self.sizes:
                self.cands[s] += [(k, c) for c in table.options(i, s, j)]
        self.shares = {
            s: np.array([c.use for _, c in self.cands[s]], float).reshape(-1, 4) / room
            for s in self.sizes
        }

    def solve(
        self,
        cuts: Sequence[AggregateCut],
        backend: str,
        deadline: Deadline,
        solver: str = "simplex",
    ) -> AggregateSolution | None:
        """The LP with `cuts` (`solver`: see `lp.Program`); None if the deadline passed first
        or it has no solution."""
        inst, prog = self.inst, Program(backend, solver=solver)
        units = [prog.add_row(1.0 if inst.mandatory(k) else -math.inf, 1.0)
                 for k in range(len(inst.units))]  # fmt: skip
        caps = {i: prog.add_row(-math.inf, cap) for i, cap in inst.caps.items()}
        pool = {(s, r): prog.add_row(-math.inf, 0.0) for s in self.sizes for r in range(4)}
        cut_rows = [prog.add_row(-math.inf, 0.0) for _ in cuts]
        nodes = prog.add_row(-math.inf, float(inst.nodes))
        by_size: dict[int, list[int]] = {s: [] for s in self.sizes}
        for n, cut in enumerate(cuts):
            by_size[cut.size].append(n)
        pattern_cols = []
        for pat in self.patterns:  # a node of pattern p adds p.count(s) meshes of size s
            rows, coefs = [nodes], [1.0]
            for s in sorted(set(pat)):
                rows += [pool[(s, r)] for r in range(4)] + [cut_rows[n] for n in by_size[s]]
                coefs += [-float(pat.count(s))] * (4 + len(by_size[s]))
            pattern_cols.append(prog.add_col(0.0, 0.0, math.inf, rows, coefs))
        cols: dict[int, list[int]] = {}
        for s in self.sizes:
            if deadline.passed():
                return None
            sh = self.shares[s]
            values = np.stack([cuts[n].values(sh) for n in by_size[s]], axis=1) if by_size[
                s] else np.zeros((len(sh), 0))  # fmt: skip
            cols[s] = []
            for (k, c), share, vals in zip(self.cands[s], sh.tolist(), values.tolist(),
                                           strict=True):  # fmt: skip
                rows = [units[k]] + [pool[(s, r)] for r in range(4) if share[r] > 0]
                coefs = [1.0] + [x for x in share if x > 0]
                rows += [cut_rows[n] for n, f in zip(by_size[s], vals, strict=True) if f > 0]
                coefs += [f for f in vals if f > 0]
                if c.model in caps:
                    rows.append(caps[c.model])
                    coefs.append(c.served)
                cols[s].append(prog.add_col(c.served, 0.0, math.inf, rows, coefs))
        if deadline.passed():
            return None
        sol = prog.solve(time_limit=max(deadline.left(), 0.05))
        if sol.status != "optimal":
            return None
        x = {s: np.array([sol.x[col] for col in cols[s]]) for s in self.sizes}
        meshes = {
            s: sum(pat.count(s) * sol.x[col] for pat, col in zip(self.patterns, pattern_cols,
                                                                  strict=True))
            for s in self.sizes
        }  # fmt: skip
        d = sol.duals
        unit_price = [d[row] if inst.mandatory(k) else max(d[row], 0.0)
                      for k, row in enumerate(units)]  # fmt: skip
        weight = {i: 1.0 - max(d[caps[i]], 0.0) if i in caps else 1.0 for i in self.models}
        return AggregateSolution(sol.value, x, meshes, unit_price, weight)
