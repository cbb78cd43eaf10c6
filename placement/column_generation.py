"""Branch and price over mesh configurations: a tight bound and a near-optimal plan, fast.

The master program picks configurations (`configurations.Config`) so that every model is on
exactly one mesh and the meshes fit the nodes (node patterns, as in the compact program). Its
LP, grown by pricing until no configuration improves it, bounds every placement from above
(and the Lagrangian bound of each pricing round bounds it even before that). The search
branches best bound first, re-pricing at each node: on a fractional number of meshes of a
size (at most k, or at least k + 1), else on a model's fractional presence on meshes of a
size (never on that size, or only on it). The integer master over the configurations found
gives the plan.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field

import pulp

from placement.candidates import CandidateTable
from placement.configurations import Config, price, price_mip
from placement.greedy import Progress
from placement.ilp_solver import run_solver
from placement.mesh_groups import node_patterns
from placement.problem import Problem

MAX_ROUNDS = 200  # pricing rounds per node


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


@dataclass(order=True)
class _Node:
    priority: float  # -bound: the heap pops the best bound first
    branch: Branch = field(compare=False)


@dataclass
class _LP:
    value: float
    counts: dict[int, float]  # meshes of each size in the LP solution
    presence: dict[tuple[int, int], float]  # (model, size): the model's weight on that size
    artificial: float  # how much of the "place every model" rows the LP left unmet
    bound: float = float("inf")  # proven bound on the node's placements (inf: none yet)
    converged: bool = False  # no column improves the LP: `value` is the node's LP optimum


@dataclass
class Incumbent:
    """The best integer placement found: configurations and node pattern counts."""

    value: float
    configs: list[Config]
    counts: dict[tuple[int, ...], int]


@dataclass
class Search:
    """What branch and price found."""

    best: Incumbent
    bound: float | None  # proven upper bound on the total served rate (None if unknown)
    nodes: int


class BranchAndPrice:
    """The configuration LP, its pricing, and the search."""

    def __init__(
        self,
        problem: Problem,
        table: CandidateTable,
        *,
        solver: str = "cbc",
        threads: int | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.problem = problem
        self.table = table
        self.solver, self.threads, self.progress = solver, threads, progress
        self.patterns = node_patterns(problem.cluster.gpus_per_node, problem.mesh_sizes)
        self.columns: dict[tuple, Config] = {}
        for i in range(problem.num_models):  # every model alone, at its best that fits
            for s in table.sizes(i):
                alone = next((c for c in table.options(i, s) if table.fits([c])), None)
                if alone is not None:
                    self.columns.setdefault(Config(s, (alone,)).key, Config(s, (alone,)))
        self.options = {
            s: [c for i in range(problem.num_models) for c in table.options(i, s)]
            for s in problem.mesh_sizes
        }
        self.penalty = 1e3 * (problem.total_rate + 1.0)
        self.final_s = 1.0  # seconds for the last integer master, past the search deadline
        self.master_s = 10.0  # seconds at most for one integer master

    def search(self, start: Incumbent, *, deadline: float, tolerance: float) -> Search:
        """Best first until every open node is within `tolerance` of the best placement."""
        t0 = time.perf_counter()
        for cfg in start.configs:
            self.columns.setdefault(cfg.key, cfg)
        best = start

        def close_enough(bound: float) -> bool:
            return bound <= best.value * (1 + tolerance) + 1e-9

        root_branch = Branch()
        root_deadline = t0 + 0.7 * (deadline - t0)  # the rest: the integer master, branching
        root = self._price(root_branch, root_deadline, best.value * (1 + tolerance))
        found = self._integer(root_branch, best, deadline)
        best = found if found.value > best.value else best
        if root is None or root.bound == float("inf"):
            return Search(best, None, 1)
        heap = [_Node(-root.bound, root_branch)]
        closed: list[float] = []  # bounds of nodes closed without being solved
        nodes, last_report = 0, t0
        while heap and not close_enough(-heap[0].priority) and time.perf_counter() < deadline:
            node = heapq.heappop(heap)
            stop = best.value * (1 + tolerance)
            lp = root if nodes == 0 else self._price(node.branch, deadline, stop)
            nodes += 1
            if lp is None:
                heapq.heappush(heap, node)
                break
            if close_enough(lp.bound) or (lp.artificial > 1e-6 and lp.converged):
                closed.append(min(lp.bound, -node.priority))  # close enough, or no placement
                continue
            if not lp.converged:  # out of time: the node stays open
                heapq.heappush(heap, _Node(-min(-node.priority, lp.bound), node.branch))
                if nodes == 1:  # the root did not converge: branching needs its LP
                    break
                continue
            children = _split(node.branch, lp, self.problem.mesh_sizes)
            if not children:  # integral where we branch: the integer master decides
                found = self._integer(node.branch, best, deadline)
                best = found if found.value > best.value else best
                closed.append(lp.bound)
                continue
            for child in children:
                heapq.heappush(heap, _Node(-lp.bound, child))
            now = time.perf_counter()
            if self.progress and now - t0 > 2.0 and now - last_report > 2.0:
                last_report = now
                self.progress(
                    f"ilp: branch and price, {nodes} nodes, best {best.value:.2f} req/s, "
                    f"bound {max(-heap[0].priority, *closed, best.value):.2f}"
                )
        if nodes > 1:  # the columns found while branching may combine better
            found = self._integer(root_branch, best, deadline + self.final_s)
            best = found if found.value > best.value else best
        bound = max([-n.priority for n in heap] + closed + [best.value])
        return Search(best, bound, nodes)

    def _integer(self, branch: Branch, start: Incumbent, deadline: float) -> Incumbent:
        """The integer master over the columns so far, within the node's restrictions."""
        columns = [c for c in self.columns.values() if branch.allows(c)]
        prob, lam, n, _ = master_program(self.problem, columns, self.patterns, integer=True)
        _count_bounds(prob, lam, columns, branch)
        chosen = {cfg.key for cfg in start.configs}
        for v, cfg in zip(lam, columns, strict=True):
            v.setInitialValue(1 if cfg.key in chosen else 0)
        for k, p in enumerate(self.patterns):
            n[k].setInitialValue(start.counts.get(p, 0))
        limit = max(min(self.master_s, deadline - time.perf_counter()), 0.5)
        try:
            run_solver(prob, self.solver, limit, None, self.threads, "ilp (master)")
        except RuntimeError:  # no integer solution within these restrictions
            return Incumbent(float("-inf"), [], {})
        picked = [cfg for v, cfg in zip(lam, columns, strict=True) if (v.value() or 0) > 0.5]
        counts = {self.patterns[k]: round(v.value() or 0) for k, v in n.items()}
        return Incumbent(sum(c.served for c in picked), picked, counts)

    def _price(self, branch: Branch, deadline: float, stop_at: float) -> _LP | None:
        """Column generation at a node, until no column improves the LP, the Lagrangian bound
        falls to `stop_at`, or the deadline; None if the LP was never solved."""
        cap = self.table.capacity.as_tuple()
        lp: _LP | None = None
        bound = float("inf")
        t0 = last_report = time.perf_counter()
        for rounds in range(MAX_ROUNDS):
            now = time.perf_counter()
            if now > deadline:
                break
            if self.progress and lp is not None and now - t0 > 2.0 and now - last_report > 2.0:
                last_report = now
                shown = "none yet" if bound == float("inf") else f"{bound:.2f}"
                self.progress(
                    f"ilp: pricing round {rounds}, LP {lp.value:.2f} req/s, bound {shown}, "
                    f"{len(self.columns)} configurations"
                )
            lp, model_price, size_price = self._master_lp(branch)
            added, best_value = 0, {}
            for s in self.problem.mesh_sizes:
                if branch.closed(s):
                    best_value[s] = 0.0
                    continue
                options = [c for c in self.options[s] if (c.model, s) not in branch.forbid]
                threshold = size_price[s] + 1e-7 * max(1.0, lp.value)
                priced = price(s, options, model_price, cap, threshold=threshold)
                if not priced.configs and not priced.exact:
                    limit = max(min(10.0, deadline - time.perf_counter()), 0.5)
                    exact = price_mip(s, options, model_price, cap, threshold, limit)
                    priced = exact if exact.exact or exact.configs else priced
                best_value[s] = priced.upper  # no configuration of size s is worth more
                for _, cfg in priced.configs:
                    if cfg.key not in self.columns:
                        self.columns[cfg.key] = cfg
                        added += 1
            bound = min(bound, self._lagrangian(model_price, best_value))
            lp.bound = bound
            if not added:
                if all(b <= size_price[s] + 1e-6 * max(1.0, lp.value)
                       for s, b in best_value.items()):  # fmt: skip
                    # converged: no configuration improves the LP, whose value bounds the node
                    lp.bound, lp.converged = min(bound, lp.value), True
                return lp  # (or pricing found nothing but could not prove there is nothing)
            if lp.artificial <= 1e-6 and bound <= stop_at:
                return lp
        return lp

    def _lagrangian(self, model_price: list[float], best_value: dict[int, float]) -> float:
        """Σ model prices + the most any packing of meshes earns at the best configurations'
        values: an upper bound on every placement, whatever the prices."""
        per_node = max(
            sum(p.count(s) * max(best_value[s], 0.0) for s in set(p)) for p in self.patterns
        )
        return sum(model_price) + self.problem.cluster.nodes * per_node

    def _master_lp(self, branch: Branch) -> tuple[_LP, list[float], dict[int, float]]:
        """The restricted master LP at a node; its duals price new columns."""
        columns = [c for c in self.columns.values() if branch.allows(c)]
        prob, lam, _, art = master_program(
            self.problem, columns, self.patterns, integer=False, penalty=self.penalty
        )
        by_size = _count_bounds(prob, lam, columns, branch)
        prob.solve(pulp.PULP_CBC_CMD(msg=False))
        if prob.status != pulp.LpStatusOptimal:
            raise RuntimeError(f"the master LP is {pulp.LpStatus[prob.status]}")
        cons = prob.constraints
        model_price = [cons[f"assign_{i}"].pi or 0.0 for i in range(self.problem.num_models)]
        size_price = {}
        for s in self.problem.mesh_sizes:
            rows = [cons[n] for n in (f"meshes_{s}", f"hi_{s}", f"lo_{s}") if n in cons]
            size_price[s] = sum(row.pi or 0.0 for row in rows)
        served, presence = 0.0, dict[tuple[int, int], float]()
        for v, cfg in zip(lam, columns, strict=True):
            x = v.value() or 0.0
            served += cfg.served * x
            for c in cfg.cands:
                presence[(c.model, cfg.size)] = presence.get((c.model, cfg.size), 0.0) + x
        counts = {
            s: sum(v.value() or 0.0 for v in by_size.get(s, [])) for s in self.problem.mesh_sizes
        }
        lp = _LP(served, counts, presence, sum(a.value() or 0.0 for a in art))
        return lp, model_price, size_price


def _split(branch: Branch, lp: _LP, sizes: tuple[int, ...]) -> list[Branch]:
    """Two children that cut off the LP solution; none if it is integral where we branch."""

    def frac(x: float) -> float:
        return min(x % 1, 1 - x % 1)

    counts = {s: c for s, c in lp.counts.items() if frac(c) > 1e-6}
    if counts:
        s = max(counts, key=lambda s: (frac(counts[s]), s))
        lo, hi = dict(branch.lo), dict(branch.hi)
        down = Branch(branch.lo, tuple({**hi, s: math.floor(counts[s])}.items()), branch.forbid)
        up = Branch(tuple({**lo, s: math.ceil(counts[s])}.items()), branch.hi, branch.forbid)
        return [down, up]
    present = {k: x for k, x in lp.presence.items() if 1e-6 < x < 1 - 1e-6}
    if present:
        (i, s) = max(present, key=lambda k: (frac(present[k]), k))
        elsewhere = {(i, t) for t in sizes if t != s}
        return [
            Branch(branch.lo, branch.hi, branch.forbid | {(i, s)}),
            Branch(branch.lo, branch.hi, branch.forbid | elsewhere),
        ]
    return []


def master_program(
    problem: Problem,
    columns: list[Config],
    patterns: list[tuple[int, ...]],
    integer: bool,
    penalty: float | None = None,
) -> tuple[pulp.LpProblem, list[pulp.LpVariable], dict[int, pulp.LpVariable], list]:
    """Choose configurations: each model placed once, meshes from node patterns.

    With a `penalty`, each model's row gets an artificial variable costing that much, which
    keeps the LP feasible whatever the columns and bounds (an LP using one is infeasible).
    """
    prob = pulp.LpProblem("master", pulp.LpMaximize)
    cat = pulp.LpBinary if integer else pulp.LpContinuous
    lam = [
        pulp.LpVariable(f"c{j}", 0, 1 if integer else None, cat=cat) for j in range(len(columns))
    ]
    ncat = pulp.LpInteger if integer else pulp.LpContinuous
    n = {
        k: pulp.LpVariable(f"n{k}", 0, problem.cluster.nodes, cat=ncat)
        for k in range(len(patterns))
    }
    art = [pulp.LpVariable(f"a{i}", 0) for i in range(problem.num_models)] if penalty else []
    obj = [(v, cfg.served) for v, cfg in zip(lam, columns, strict=True)]
    prob += pulp.LpAffineExpression(obj + [(a, -(penalty or 0.0)) for a in art])
    by_model: dict[int, list[pulp.LpVariable]] = {i: [] for i in range(problem.num_models)}
    by_size: dict[int, list[pulp.LpVariable]] = {s: [] for s in problem.mesh_sizes}
    for v, cfg in zip(lam, columns, strict=True):
        by_size[cfg.size].append(v)
        for c in cfg.cands:
            by_model[c.model].append(v)
    for i, vs in by_model.items():
        extra = [(art[i], 1)] if art else []
        prob += pulp.LpAffineExpression([(v, 1) for v in vs] + extra) == 1, f"assign_{i}"
    for s, vs in by_size.items():
        supply = [(n[k], p.count(s)) for k, p in enumerate(patterns) if s in p]
        lhs = pulp.LpAffineExpression([(v, 1) for v in vs] + [(x, -c) for x, c in supply])
        prob += lhs <= 0, f"meshes_{s}"
    prob += pulp.lpSum(n.values()) <= problem.cluster.nodes, "nodes"
    return prob, lam, n, art


def _count_bounds(
    prob: pulp.LpProblem, lam: list[pulp.LpVariable], columns: list[Config], branch: Branch
) -> dict[int, list[pulp.LpVariable]]:
    """Bound the number of meshes of each size; returns the columns' variables by size."""
    by_size: dict[int, list[pulp.LpVariable]] = {}
    for v, c in zip(lam, columns, strict=True):
        by_size.setdefault(c.size, []).append(v)
    for s, k in branch.hi:
        prob += pulp.lpSum(by_size.get(s, [])) <= k, f"hi_{s}"
    for s, k in branch.lo:
        prob += pulp.lpSum(by_size.get(s, [])) >= k, f"lo_{s}"
    return by_size
