"""The restricted master program over mesh configurations: a column per configuration.

It picks configurations (`configurations.Config`) so that every unit (a model, or one of its
replicas) is on at most one mesh — replica 0 of every model on exactly one —, a replicated
model's replicas serve at most its rate together, and the meshes fit the nodes (node
patterns). Its LP's duals price new columns (`column_generation`); the same program with
integer columns, the integer master, makes a plan of the columns so far. It is built once
and grown a column at a time, so HiGHS re-solves it warm; a search node's restrictions
(`Branch`) are bounds, set before each solve.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from placement.configurations import Config
from placement.deadline import Deadline
from placement.instance import Instance
from placement.lp import Program
from placement.mesh_groups import MeshPacker, node_patterns, pattern_counts

MASTER_NODES = 5000  # branch-and-bound nodes of one integer master


@dataclass
class Incumbent:
    """A feasible placement: its configurations (meshes are placed on nodes afterwards)."""

    value: float
    configs: list[Config]


@dataclass(frozen=True)
class Branch:
    """The restrictions of a search node."""

    lo: tuple[tuple[int, int], ...] = ()  # (size, k): at least k meshes of that size
    hi: tuple[tuple[int, int], ...] = ()  # (size, k): at most k
    forbid: frozenset[tuple[int, int]] = frozenset()  # (model, size): never on that size

    def allows(self, cfg: Config) -> bool:
        return all((c.model, cfg.size) not in self.forbid for c in cfg.cands)

    def closed(self, size: int) -> bool:
        return any(s == size and k == 0 for s, k in self.hi)


@dataclass
class MasterLP:
    """The master LP's solution at a search node, and what the node's pricing proved."""

    value: float
    counts: dict[int, float]  # meshes of each size in the LP solution
    presence: dict[tuple[int, int], float]  # (model, size): the model's weight on that size
    artificial: float  # how much of the "place replica 0" rows the LP left unmet
    bound: float = math.inf  # proven bound on the node's placements (inf: none yet)
    converged: bool = False  # no column improves the LP: `value` is the node's LP optimum


class Master:
    """The restricted master program of one instance, and its configurations."""

    def __init__(self, instance: Instance, *, threads: int | None, backend: str) -> None:
        inst = self.inst = instance
        problem = instance.table.problem
        gpus = problem.cluster.gpus_per_node
        self.patterns = node_patterns(gpus, problem.mesh_sizes)
        self.packer = MeshPacker(instance.nodes, gpus, problem.mesh_sizes)
        self.unit_index = {u: k for k, u in enumerate(instance.units)}
        self.models = list(instance.model_units)
        # an unmet "place replica 0" row costs more than any plan serves
        self.penalty = 1e3 * (problem.total_rate + 1.0)
        self.columns: dict[tuple, int] = {}  # config key -> column
        self.configs: list[Config] = []  # per config column, in column order
        self.config_cols: list[int] = []
        prog = self.prog = Program(backend, threads)
        self.unit_rows = [
            prog.add_row(1.0 if inst.mandatory(k) else -math.inf, 1.0)
            for k in range(len(inst.units))
        ]
        self.cap_rows = {i: prog.add_row(-math.inf, cap) for i, cap in inst.caps.items()}
        self.size_rows = {s: prog.add_row(-math.inf, 0.0) for s in inst.sizes}  # ≤ supply
        self.count_rows = {s: prog.add_row(0.0, math.inf) for s in inst.sizes}  # branching
        self.nodes_row = prog.add_row(-math.inf, float(inst.nodes))
        self.pattern_cols = []
        for p in self.patterns:
            rows = [self.size_rows[s] for s in inst.sizes if s in p] + [self.nodes_row]
            coefs = [-float(p.count(s)) for s in inst.sizes if s in p] + [1.0]
            self.pattern_cols.append(
                prog.add_col(0.0, 0.0, float(inst.nodes), rows, coefs, integer=True)
            )
        self.artificial_cols = [
            prog.add_col(-self.penalty, 0.0, math.inf, [self.unit_rows[k]], [1.0])
            for k in range(len(inst.units))
            if inst.mandatory(k)
        ]

    def add(self, cfg: Config) -> bool:
        """Add a configuration as a column; False if it is there already."""
        key = cfg.key
        if key in self.columns:
            return False
        rows, coefs = [], []
        for c in cfg.cands:
            rows.append(self.unit_rows[self.unit_index[(c.model, c.replica)]])
            coefs.append(1.0)
            if c.model in self.cap_rows:
                rows.append(self.cap_rows[c.model])
                coefs.append(c.served)
        rows += [self.size_rows[cfg.size], self.count_rows[cfg.size]]
        coefs += [1.0, 1.0]
        col = self.prog.add_col(cfg.served, 0.0, math.inf, rows, coefs, integer=True)
        self.columns[key] = col
        self.configs.append(cfg)
        self.config_cols.append(col)
        return True

    def restrict(self, branch: Branch, integer: bool) -> None:
        """Apply a node's restrictions: forbidden columns to 0, bounds on mesh counts."""
        hi_bound = 1.0 if integer else math.inf
        for cfg, col in zip(self.configs, self.config_cols, strict=True):
            self.prog.set_col_bounds(col, 0.0, hi_bound if branch.allows(cfg) else 0.0)
        lo, hi = dict(branch.lo), dict(branch.hi)
        for s, row in self.count_rows.items():
            self.prog.set_row_bounds(row, float(lo.get(s, 0)), float(hi.get(s, math.inf)))
        for col in self.artificial_cols:
            self.prog.set_col_bounds(col, 0.0, 0.0 if integer else math.inf)

    def integer(
        self,
        branch: Branch,
        start: Incumbent | None,
        deadline: Deadline,
        node_limit: int = MASTER_NODES,
    ) -> Incumbent | None:
        """The integer master over the columns so far, within the node's restrictions."""
        if deadline.passed() and start is not None:
            return None
        self.restrict(branch, integer=True)
        x0 = None
        if start is not None and all(branch.allows(c) for c in start.configs):
            x0 = self._start_vector(start)
        sol = self.prog.solve_mip(max(deadline.left(), 0.2), node_limit, x0)
        self.restrict(branch, integer=False)
        if not sol.feasible:
            return None
        picked = [cfg for cfg, col in zip(self.configs, self.config_cols, strict=True)
                  if sol.x[col] > 0.5]  # fmt: skip
        if self.packer.place([c.size for c in picked]) is None:
            return None  # cannot happen for a solution within the node patterns
        return Incumbent(sum(c.served for c in picked), picked)

    def _start_vector(self, start: Incumbent) -> list[float] | None:
        nodes = self.packer.by_node(start.configs)
        if nodes is None:
            return None
        x = [0.0] * self.prog.num_cols
        for cfg in start.configs:
            x[self.columns[cfg.key]] = 1.0
        per_node = [[cfg.size for cfg in node] for node in nodes]
        for col, count in zip(self.pattern_cols, pattern_counts(self.patterns, per_node),
                              strict=True):  # fmt: skip
            x[col] = float(count)
        return x

    def lp(
        self, branch: Branch, deadline: Deadline
    ) -> tuple[MasterLP, list[float], dict[int, float], dict[int, float]] | None:
        """The restricted master LP at a node, and its duals, which price new columns: unit
        prices, each model's weight (1 less its rate cap's dual), each size's price. None where the
        node's mesh counts admit no solution (then no placement of the node exists) or the
        solve ran out of time."""
        self.restrict(branch, integer=False)
        sol = self.prog.solve(time_limit=max(deadline.left(), 0.05))
        if sol.status != "optimal":
            return None
        d = sol.duals
        unit_price = []
        for k, row in enumerate(self.unit_rows):  # an optional unit's price is ≥ 0
            unit_price.append(d[row] if self.inst.mandatory(k) else max(d[row], 0.0))
        weight = {i: 1.0 - max(d[row], 0.0) for i, row in self.cap_rows.items()}
        weight_all = {i: weight.get(i, 1.0) for i in self.models}
        size_price = {s: d[self.size_rows[s]] + d[self.count_rows[s]] for s in self.inst.sizes}
        served, presence = 0.0, dict[tuple[int, int], float]()
        counts = dict.fromkeys(self.inst.sizes, 0.0)
        for cfg, col in zip(self.configs, self.config_cols, strict=True):
            x = sol.x[col]
            if x <= 1e-12:
                continue
            served += cfg.served * x
            counts[cfg.size] += x
            for c in cfg.cands:
                presence[(c.model, cfg.size)] = presence.get((c.model, cfg.size), 0.0) + x
        artificial = sum(sol.x[col] for col in self.artificial_cols)
        lp = MasterLP(served, counts, presence, artificial)
        return lp, unit_price, weight_all, size_price


def split(
    branch: Branch, lp: MasterLP, sizes: tuple[int, ...], replicated: Mapping[int, float]
) -> list[Branch]:
    """Two children of a search node that cut off its LP solution; none if it is integral
    where we branch."""

    def frac(x: float) -> float:
        return min(x % 1, 1 - x % 1)

    counts = {s: c for s, c in lp.counts.items() if frac(c) > 1e-6}
    if counts:
        s = max(counts, key=lambda s: (frac(counts[s]), s))
        lo, hi = dict(branch.lo), dict(branch.hi)
        down = Branch(branch.lo, tuple({**hi, s: math.floor(counts[s])}.items()), branch.forbid)
        up = Branch(tuple({**lo, s: math.ceil(counts[s])}.items()), branch.hi, branch.forbid)
        return [down, up]
    # a replicated model may be on several sizes at once: "never on s" or "only on s" would
    # not cover every placement, so only models on one mesh are branched on
    present = {
        k: x for k, x in lp.presence.items() if 1e-6 < x < 1 - 1e-6 and k[0] not in replicated
    }
    if present:
        (i, s) = max(present, key=lambda k: (frac(present[k]), k))
        elsewhere = {(i, t) for t in sizes if t != s}
        return [
            Branch(branch.lo, branch.hi, branch.forbid | {(i, s)}),
            Branch(branch.lo, branch.hi, branch.forbid | elsewhere),
        ]
    return []
