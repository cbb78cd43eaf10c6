"""The optimal placement under the cost model: an integer program, solved within a time limit.

Decisions: how each node splits into meshes (node patterns), which mesh hosts each model (and
each replica) and at which candidate (SM level, service level) — so its SM shares and KV share
— subject to each mesh's memory, SM time, HBM time and SM admission (see `candidates`).
Objective: total served rate, each model capped at its own rate; or max–min fairness (the
least served / requested ratio first, then the total).

For throughput, in this order, all within one deadline:
1. the greedy plan (the warm start; never returned worse than),
2. branch and price over mesh configurations (`column_generation`): the bound, and a plan,
3. local search (`local_search`): two nodes at a time re-planned exactly, while time is left,
4. the compact program (below), for instances small enough to solve whole, when a gap is left.
At scale (`_at_scale`) steps 2 and 3 give way to the aggregate LP's bound (its cuts
separated, `cut_bound`) and a plan made node by node over several deals, their meshes
combined by the integer master over their pool (`decomposition`, `column_pool`); the greedy
runs there only if that finds no plan.
For fairness, the compact program. Any solution that does not decode into a feasible plan
(every model placed once, each mesh within capacity, the meshes packable on the nodes) is
dropped with a note, and the best feasible one is kept. The reported bound is the least of
the bounds found and the sum of what each model can serve at most (never above its rate).

The compact program breaks the symmetry of interchangeable meshes with representatives:
slot (s, r) exists only if unit r is on it, and holds only units after r in a fixed order.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import pulp

from muxserve.errors import ConfigError
from placement.candidates import RESOURCES, Candidate, CandidateTable, Mode, build_candidates
from placement.column_generation import BranchAndPrice
from placement.column_pool import ColumnPool
from placement.configurations import Config
from placement.cut_bound import cut_bound
from placement.deadline import Deadline
from placement.decomposition import plan_by_deals
from placement.greedy import Progress, solve_greedy, stderr_progress
from placement.ilp_solver import SOLVERS, run_solver
from placement.instance import Instance
from placement.local_search import improve
from placement.lp import highs_available
from placement.master import Incumbent
from placement.mesh_groups import MeshPacker, node_patterns, pattern_counts
from placement.plan import Placement, assemble
from placement.problem import Problem

Objective = Literal["throughput", "fair"]
COMPACT_MAX_VARIABLES = 20_000  # larger compact programs are not worth solving whole
# at scale (this many nodes and units) the configuration LP does not converge in a minute:
# the aggregate LP bounds, and the plan is the best combination of the meshes that node-by-
# node searches over several deals found (re-planning pairs of nodes after it found nothing
# better on 64/64: 8 pairs, 12 CPU-s, 589.68 req/s before and after)
SCALE_NODES = 4
SCALE_UNITS = 40


def _at_scale(problem: Problem, table: CandidateTable) -> bool:
    return problem.cluster.nodes >= SCALE_NODES and len(table.units) >= SCALE_UNITS


def solve_ilp(
    problem: Problem,
    table: CandidateTable | None = None,
    *,
    objective: Objective = "throughput",
    time_limit: float = 60.0,
    gap_tolerance: float = 1e-3,
    solver: str = "auto",
    warm_start: Placement | None = None,
    progress: Progress | None = stderr_progress,
    threads: int | None = None,
    deadline: Deadline | None = None,
) -> Placement:
    """The best placement found within `time_limit` (or `deadline`), with its bound and gap."""
    if solver not in (*SOLVERS, "auto"):
        raise ConfigError(f"unknown solver {solver!r}; choose one of auto, {', '.join(SOLVERS)}")
    if solver == "highs" and not highs_available():
        raise ConfigError("solver 'highs' needs highspy: pip install highspy")
    start = time.perf_counter()
    deadline = deadline or Deadline.after(time_limit)
    table = table or build_candidates(problem, Mode.MUX, deadline=deadline)
    backend = "highs" if solver == "auto" and highs_available() else solver
    backend = "cbc" if backend == "auto" else backend
    run = _Run(problem, table, backend, threads, progress, deadline)
    at_scale = objective == "throughput" and _at_scale(problem, table)
    if warm_start is not None:
        run.offer(_configs(problem, table, warm_start), "the warm start")
    elif not at_scale:  # at scale the greedy is far behind (390 vs 570 req/s on 64/64)
        run.greedy()
    if at_scale:
        run.aggregate_bound()
        run.by_nodes()
        if run.best is None:  # no deal's nodes held their models: the greedy may
            run.greedy()
    elif objective == "throughput":
        run.branch_and_price(gap_tolerance)
        if run.gap() > gap_tolerance and not deadline.passed() and run.best is not None:
            run.local_search()
    if objective == "fair" or (
        run.gap() > gap_tolerance
        and deadline.left() > 2.0
        and _compact_size(table) <= COMPACT_MAX_VARIABLES
    ):
        run.compact(objective)
    if run.best is None:
        deadline.check("searching for a placement")
        raise ConfigError(
            f"no placement holds all {problem.num_models} models on this cluster "
            f"(weights, activations and KV for one request each exceed its memory)"
        )
    return run.finish(start, gap_tolerance, objective)


class _Run:
    """The best plan so far, the best bound, and what to say about how they were found."""

    def __init__(
        self,
        problem: Problem,
        table: CandidateTable,
        backend: str,
        threads: int | None,
        progress: Progress | None,
        deadline: Deadline,
    ) -> None:
        self.problem, self.table, self.backend = problem, table, backend
        self.threads, self.progress, self.deadline = threads, progress, deadline
        cl = problem.cluster
        self.packer = MeshPacker(cl.nodes, cl.gpus_per_node, problem.mesh_sizes)
        self.best: list[Config] | None = None
        self.value = -math.inf
        self.bound = cap_bound(table)
        self.notes: list[str] = []
        self.cut: list[str] = []  # phases the deadline stopped before their work limits
        self.work: dict[str, int] = {}  # work done at scale: searches, rounds, pairs
        self.pool = ColumnPool()  # at scale: every configuration the small searches priced

    def gap(self) -> float:
        return math.inf if self.best is None else _gap(self.value, self.bound)

    def offer(self, configs: list[Config], source: str) -> bool:
        """Keep `configs` if they are a feasible plan better than the best; else say why not."""
        why = check(self.table, configs, self.packer)
        if why is not None:
            self.notes.append(
                f"{source} did not decode into a feasible plan ({why}); kept the best"
            )
            if self.progress:
                self.progress(f"ilp: {self.notes[-1]}")
            return False
        value = sum(c.served for c in configs)
        if value > self.value + 1e-9:
            self.best, self.value = configs, value
            return True
        return False

    def greedy(self) -> None:
        try:
            plan = solve_greedy(
                self.problem, self.table, progress=self.progress,
                deadline=self.deadline.fraction(0.3),
            )  # fmt: skip
            self.offer(_configs(self.problem, self.table, plan), "the greedy plan")
        except ConfigError:  # the greedy found no group that holds everyone; the ILP may
            pass

    def tighten(self, bound: float | None) -> None:
        if bound is not None and math.isfinite(bound):
            self.bound = min(self.bound, max(bound, self.value))

    def branch_and_price(self, tolerance: float) -> None:
        bp = BranchAndPrice(
            Instance.whole(self.table),
            threads=self.threads,
            progress=self.progress,
            backend=self.backend,
        )
        start = None if self.best is None else Incumbent(self.value, self.best)
        share = 0.4 if self.problem.cluster.nodes > 1 else 0.9  # the rest: local search
        found = bp.search(start, deadline=self.deadline.fraction(share), tolerance=tolerance)
        if found.best is not None:
            self.offer(found.best.configs, "branch and price")
        self.tighten(found.bound)
        if not found.converged:
            self.notes.append(
                f"the configuration LP did not converge in time ({found.rounds} pricing rounds): "
                "the bound is a Lagrangian one"
            )

    def aggregate_bound(self) -> None:
        """The aggregate LP's bound with separated cuts (`cut_bound`), in about a second."""
        if self.deadline.passed():
            return
        found = cut_bound(self.table, deadline=self.deadline, backend=self.backend)
        if found is not None:
            self.tighten(found.value)

    def by_nodes(self) -> None:
        found, cut = plan_by_deals(
            self.table,
            deadline=self.deadline,
            pool=self.pool,
            threads=self.threads,
            backend=self.backend,
            progress=self.progress,
            stats=self.work,
        )
        if cut:
            self.cut.append("the node-by-node plan")
        if found is not None:
            self.offer(found.configs, "the node-by-node plan")

    def local_search(self) -> None:
        assert self.best is not None
        found = improve(
            self.table,
            Incumbent(self.value, self.best),
            deadline=self.deadline,
            threads=self.threads,
            backend=self.backend,
            progress=self.progress,
            stats=self.work,
        )
        if self.deadline.passed():
            self.cut.append("the local search")
        self.offer(found.configs, "the local search")

    def compact(self, objective: Objective) -> None:
        limit = max(self.deadline.left() - 0.5, 0.1)
        solver = "highs" if self.backend == "highs" else "cbc"
        plan, bound = _compact(
            self.problem,
            self.table,
            self.best,
            self.bound if objective == "throughput" else None,
            objective,
            limit,
            solver,
            self.progress,
            self.threads,
        )
        if plan is not None:
            if objective == "fair" and check(self.table, plan, self.packer) is None:
                self.best, self.value = plan, sum(c.served for c in plan)  # fairness first
            else:
                self.offer(plan, "the compact program's solution")
        if objective == "throughput":
            self.tighten(bound)
        elif bound is not None:
            self.bound = min(max(bound, self.value), cap_bound(self.table))

    def finish(self, start: float, tolerance: float, objective: Objective) -> Placement:
        assert self.best is not None
        where = self.packer.place([c.size for c in self.best])
        assert where is not None
        meshes = [
            (node, gpus, list(cfg.cands))
            for (node, gpus), cfg in zip(where, self.best, strict=True)
        ]
        gap = _gap(self.value, self.bound)
        if self.work:
            done = ", ".join(f"{n} {what}" for what, n in self.work.items())
            self.notes.append(f"work: {done}")
        if self.cut:
            self.notes.append(
                f"the time limit cut {' and '.join(self.cut)} short: this plan depends on the "
                "CPU time the run got (a longer limit or a quieter machine may find a better one)"
            )
        if gap <= 1e-6:
            status = "optimal"
        elif gap <= tolerance:
            status = "near-optimal"
        else:
            status = "time limit" if self.deadline.passed() else "gap left"
        if objective == "fair":
            status = "optimal" if gap <= 1e-6 else "heuristic"
        return assemble(
            self.problem,
            self.table,
            "ilp",
            meshes,
            solve_time_s=time.perf_counter() - start,
            status=status,
            gap=gap,
            bound=self.bound,
            notes=tuple(self.notes),
        )


def cap_bound(table: CandidateTable) -> float:
    """Σ over models of the most it can serve: its rate, or what all its replicas serve at
    their best — no placement serves more."""
    p = table.problem
    total = 0.0
    for i in range(p.num_models):
        most = max((c.served for s in table.sizes(i) for c in table.options(i, s)), default=0.0)
        total += min(p.targets[i].rate, table.replicas(i) * most)
    return total


def check(table: CandidateTable, configs: list[Config], packer: MeshPacker) -> str | None:
    """Why these meshes are not a feasible plan, or None if they are."""
    p = table.problem
    seen: dict[tuple[int, int], int] = {}
    served = [0.0] * p.num_models
    for k, cfg in enumerate(configs):
        models = [c.model for c in cfg.cands]
        if len(set(models)) != len(models):
            return f"mesh {k} hosts a model twice"
        if any(c.size != cfg.size for c in cfg.cands):
            return f"mesh {k} mixes candidates of other mesh sizes"
        if not table.fits(cfg.cands):
            return f"mesh {k} ({cfg.size} GPUs) is over capacity"
        for c in cfg.cands:
            seen[(c.model, c.replica)] = seen.get((c.model, c.replica), 0) + 1
            served[c.model] += c.served
    for i in range(p.num_models):
        if seen.get((i, 0), 0) != 1:
            return f"{p.specs[i].name} is placed {seen.get((i, 0), 0)} times"
        if any(n > 1 for (m, _), n in seen.items() if m == i):
            return f"a replica of {p.specs[i].name} is placed twice"
        if served[i] > p.targets[i].rate * (1 + 1e-6) + 1e-9 and table.replicas(i) > 1:
            return f"the replicas of {p.specs[i].name} serve more than its rate"
    if packer.place([c.size for c in configs]) is None:
        sizes = sorted((c.size for c in configs), reverse=True)
        return f"meshes of {sizes} GPUs do not fit on the nodes"
    return None


def _gap(value: float, bound: float) -> float:
    return max(bound - value, 0.0) / max(value, 1e-9)


def _cands(problem: Problem, table: CandidateTable, size: int, models: tuple) -> list[Candidate]:
    """The candidates a placed mesh's models came from."""
    out = []
    for pm in models:
        i = problem.index(pm.name)
        share = pm.time_share if pm.time_share is not None else pm.decode_share
        out.append(
            next(
                c
                for c in table.options(i, size, pm.replica)
                if abs(c.share - share) < 1e-9 and abs(c.served - pm.served) <= 1e-9 * c.served
            )
        )
    return out


def _configs(problem: Problem, table: CandidateTable, plan: Placement) -> list[Config]:
    return [Config(m.size, tuple(_cands(problem, table, m.size, m.models))) for m in plan.meshes]


# ---- the compact program ----------------------------------------------------------------
@dataclass
class _Compact:
    """The program and the handles needed to read a solution back."""

    prob: pulp.LpProblem
    x: dict[tuple[int, int, int, int], pulp.LpVariable]  # (unit, size, rep unit, cand idx)
    n: dict[int, pulp.LpVariable]  # node pattern index -> how many nodes use it
    served: pulp.LpAffineExpression
    ratio: dict[int, pulp.LpAffineExpression]  # model -> served / requested
    patterns: list[tuple[int, ...]]
    order: list[int]  # representative order of the units


def _compact_size(table: CandidateTable) -> int:
    """How many binaries the compact program has (its slots times their options)."""
    p = table.problem
    total = 0
    for s in p.mesh_sizes:
        per_unit = [len(table.options(i, s)) for i, _ in table.units if table.options(i, s)]
        n = len(per_unit)
        total += sum(per_unit) * (n + 1) // 2
    return total


def _compact(
    problem: Problem,
    table: CandidateTable,
    start_plan: list[Config] | None,
    bound: float | None,
    objective: Objective,
    time_limit: float,
    solver: str,
    progress: Progress | None,
    threads: int | None,
) -> tuple[list[Config] | None, float | None]:
    """Solve the compact program; returns its plan (None: none found) and its bound."""
    t0 = time.perf_counter()
    m = _build(problem, table)
    first = None
    if start_plan is not None:
        _set_start(m, table, start_plan)
    if bound is not None:
        m.prob += m.served <= bound * (1 + 1e-9) + 1e-9, "bound"
    if objective == "fair":
        theta = pulp.LpVariable("theta", 0, 1)
        for ratio in m.ratio.values():
            m.prob += theta <= ratio
        m.prob.setObjective(theta)
        if start_plan is not None:
            theta.setInitialValue(_fairness(problem, start_plan))
        try:
            first = run_solver(m.prob, solver, time_limit / 2, progress, threads, "ilp (fairness)")
        except RuntimeError:
            return None, None
        m.prob += theta >= (theta.value() or 0.0) - 1e-7, "fairness"
        time_limit = max(time_limit - (time.perf_counter() - t0), 1.0)
        decoded = _decode(m, table)
        if decoded is not None:
            _set_start(m, table, decoded)
    m.prob.setObjective(m.served)
    try:
        result = run_solver(m.prob, solver, time_limit, progress, threads, "ilp")
    except RuntimeError:
        return None, None
    if objective == "fair" and (first is None or not first.optimal):
        return _decode(m, table), None  # the fairness level itself is not proven
    return _decode(m, table), result.bound


def _fairness(problem: Problem, configs: list[Config]) -> float:
    served = [0.0] * problem.num_models
    for cfg in configs:
        for c in cfg.cands:
            served[c.model] += c.served
    return min(s / t.rate for s, t in zip(served, problem.targets, strict=True))


def _build(problem: Problem, table: CandidateTable) -> _Compact:
    prob = pulp.LpProblem("placement", pulp.LpMaximize)
    units = table.units

    def smallest(k: int) -> int:
        return min(table.sizes(units[k][0]))

    order = sorted(
        range(len(units)),
        key=lambda k: (-smallest(k), units[k][1], -problem.targets[units[k][0]].rate, k),
    )
    patterns = node_patterns(problem.cluster.gpus_per_node, problem.mesh_sizes)
    n = {
        k: pulp.LpVariable(f"n{k}", 0, problem.cluster.nodes, cat=pulp.LpInteger)
        for k in range(len(patterns))
    }
    prob += pulp.lpSum(n.values()) <= problem.cluster.nodes, "nodes"
    x: dict[tuple[int, int, int, int], pulp.LpVariable] = {}
    per_unit: dict[int, list[tuple[pulp.LpVariable, Candidate]]] = {k: [] for k in order}
    cap = table.capacity.as_tuple()
    for s in problem.mesh_sizes:
        eligible = [k for k in order if table.options(units[k][0], s)]
        opens = []
        for a, r in enumerate(eligible):
            slot: dict[int, list[tuple[pulp.LpVariable, Candidate]]] = {}
            for k in eligible[a:]:
                i, j = units[k]
                slot[k] = []
                for li, c in enumerate(table.options(i, s, j)):
                    v = pulp.LpVariable(f"x_{k}_{s}_{r}_{li}", cat=pulp.LpBinary)
                    x[(k, s, r, li)] = v
                    slot[k].append((v, c))
                    per_unit[k].append((v, c))
            is_open = pulp.LpAffineExpression([(v, 1) for v, _ in slot[r]])
            opens.append(is_open)
            for k in eligible[a + 1 :]:
                prob += pulp.LpAffineExpression([(v, 1) for v, _ in slot[k]]) <= is_open
            by_model: dict[int, list[pulp.LpVariable]] = {}
            for k, vcs in slot.items():
                by_model.setdefault(units[k][0], []).extend(v for v, _ in vcs)
            for i, vs in by_model.items():  # a mesh hosts a model (any of its replicas) once
                if len({units[k][1] for k in slot if units[k][0] == i}) > 1:
                    prob += pulp.lpSum(vs) <= is_open, f"once_{i}_{s}_{r}"
            for q, name in enumerate(RESOURCES):
                terms = [(v, c.use[q]) for vc in slot.values() for v, c in vc if c.use[q] > 0]
                if terms:
                    prob += pulp.LpAffineExpression(terms) <= cap[q] * is_open, f"{name}_{s}_{r}"
        if opens:
            supply = pulp.lpSum(cnt * n[k] for k, p in enumerate(patterns) if (cnt := p.count(s)))
            prob += pulp.lpSum(opens) <= supply, f"meshes_{s}"
    for k, vs in per_unit.items():
        row = pulp.LpAffineExpression([(v, 1) for v, _ in vs])
        prob += (row == 1) if units[k][1] == 0 else (row <= 1), f"assign_{k}"
    by_model_served: dict[int, list[tuple[pulp.LpVariable, float]]] = {}
    for k, vs in per_unit.items():
        by_model_served.setdefault(units[k][0], []).extend((v, c.served) for v, c in vs)
    for i, terms in by_model_served.items():
        if table.replicas(i) > 1:
            prob += pulp.LpAffineExpression(terms) <= problem.targets[i].rate, f"rate_{i}"
    served = pulp.LpAffineExpression([(v, c.served) for vs in per_unit.values() for v, c in vs])
    ratio = {
        i: pulp.LpAffineExpression([(v, w / problem.targets[i].rate) for v, w in terms])
        for i, terms in by_model_served.items()
    }
    return _Compact(prob, x, n, served, ratio, patterns, order)


def _set_start(m: _Compact, table: CandidateTable, plan: list[Config]) -> None:
    """Give the solver a feasible start so it never returns a worse plan."""
    for v in m.x.values():
        v.setInitialValue(0)
    pos = {k: q for q, k in enumerate(m.order)}
    for cfg in plan:
        ks = [table.unit(c) for c in cfg.cands]
        rep = min(ks, key=lambda k: pos[k])
        for k, c in zip(ks, cfg.cands, strict=True):
            li = table.options(c.model, cfg.size, c.replica).index(c)
            m.x[(k, cfg.size, rep, li)].setInitialValue(1)
    cl = table.problem.cluster
    packer = MeshPacker(cl.nodes, cl.gpus_per_node, table.problem.mesh_sizes)
    nodes = packer.by_node(plan)
    if nodes is None:
        return
    per_node = [[cfg.size for cfg in node] for node in nodes]
    for k, count in enumerate(pattern_counts(m.patterns, per_node)):
        m.n[k].setInitialValue(count)


def _decode(m: _Compact, table: CandidateTable) -> list[Config] | None:
    """The solution's slots as mesh configurations (checked by the caller); None if empty."""
    slots: dict[tuple[int, int], list[Candidate]] = {}
    for (k, s, r, li), v in m.x.items():
        if (v.value() or 0) > 0.5:
            i, j = table.units[k]
            slots.setdefault((s, r), []).append(table.options(i, s, j)[li])
    if not slots:
        return None
    return [Config(s, tuple(cands)) for (s, _), cands in sorted(slots.items())]
