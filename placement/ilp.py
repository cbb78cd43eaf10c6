"""The optimal placement under the cost model: an integer program (pulp; CBC or HiGHS).

Decisions: how each node splits into meshes (an integer per node pattern), which mesh hosts
each model and at which candidate (SM level) — so its SM shares and KV share — subject to
each mesh's memory, SM time, HBM time and SM admission (see `candidates`). Objective: total
served rate, each model capped at its own rate; or max–min fairness (the least served /
requested ratio first, then the total).

For throughput, column generation over mesh configurations gives a tight bound and a
near-optimal plan in seconds; if a gap above the tolerance remains, the compact program
(below), warm-started from that plan and cut at the bound, runs for the time left. The
compact program breaks the symmetry of interchangeable meshes with representatives: slot
(s, r) exists only if model r is on it, and holds only models after r in a fixed order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import pulp

from muxserve.errors import ConfigError
from placement.candidates import RESOURCES, Candidate, CandidateTable, Mode, build_candidates
from placement.column_generation import BranchAndPrice, Incumbent
from placement.configurations import Config
from placement.greedy import Progress, solve_greedy, stderr_progress
from placement.ilp_solver import run_solver
from placement.mesh_groups import node_patterns, pattern_counts, positions
from placement.plan import Placement, assemble
from placement.problem import Problem

Objective = Literal["throughput", "fair"]


def solve_ilp(
    problem: Problem,
    table: CandidateTable | None = None,
    *,
    objective: Objective = "throughput",
    time_limit: float = 60.0,
    gap_tolerance: float = 1e-3,
    solver: str = "cbc",
    warm_start: Placement | None = None,
    progress: Progress | None = stderr_progress,
    threads: int | None = None,
) -> Placement:
    """The best placement found within `time_limit`, with its optimality gap."""
    start = time.perf_counter()
    table = table or build_candidates(problem, Mode.MUX)
    best: Placement | None = warm_start
    if best is None:
        try:
            best = solve_greedy(problem, table, progress=progress)
        except ConfigError:  # the greedy found no group that holds everyone; the ILP may
            best = None

    def left() -> float:
        return max(time_limit - (time.perf_counter() - start), 0.0)

    def value(plan: Placement | None) -> float:
        return float("-inf") if plan is None else plan.served_total

    bound: float | None = None
    if objective == "throughput":
        initial = Incumbent(float("-inf"), [], {})
        if best is not None:
            patterns = node_patterns(problem.cluster.gpus_per_node, problem.mesh_sizes)
            nodes = [[m.size for m in best.meshes if m.node == k]
                     for k in range(problem.cluster.nodes)]  # fmt: skip
            counts = dict(zip(patterns, pattern_counts(patterns, nodes), strict=True))
            initial = Incumbent(best.served_total, _configs(problem, table, best), counts)
        bp = BranchAndPrice(problem, table, solver=solver, threads=threads, progress=progress)
        bp.final_s = 0.1 * time_limit
        bp.master_s = max(10.0, 0.2 * time_limit)
        found = bp.search(initial, deadline=start + 0.75 * time_limit, tolerance=gap_tolerance)
        if found.best.value > value(best) + 1e-9:
            best = _from_configs(problem, table, found.best.configs, found.best.counts)
        bound = found.bound
    unproven = best is None or bound is None or _gap(best.served_total, bound) > gap_tolerance
    if unproven and (best is None or objective == "fair" or left() > 2.0):
        compact, compact_bound = _compact(
            problem,
            table,
            best,
            bound,
            objective,
            max(left() - 1.0, 1.0),
            solver,
            progress,
            threads,
        )
        if compact is not None and (objective == "fair" or compact.served_total > value(best)):
            best = compact
        if compact_bound is not None:
            bound = compact_bound if bound is None else min(bound, compact_bound)
    if best is None:
        raise ConfigError(
            f"no placement holds all {problem.num_models} models on this cluster "
            f"(weights, activations and KV for one request each exceed its memory)"
        )
    return _finish(problem, table, best, bound, start)


def _gap(value: float, bound: float) -> float:
    return max(bound - value, 0.0) / max(value, 1e-9)


def _finish(
    problem: Problem, table: CandidateTable, plan: Placement, bound: float | None, start: float
) -> Placement:
    if bound is None:
        gap, status = None, "time limit"
    else:
        gap = _gap(plan.served_total, bound)
        status = "optimal" if gap <= 1e-6 else "near-optimal"
    meshes = [(m.node, m.gpus, _cands(problem, table, m.size, m.models)) for m in plan.meshes]
    return assemble(
        problem,
        table,
        "ilp",
        meshes,
        solve_time_s=time.perf_counter() - start,
        status=status,
        gap=gap,
    )


def _cands(problem: Problem, table: CandidateTable, size: int, models: tuple) -> list[Candidate]:
    """The candidates a placed mesh's models came from."""
    out = []
    for pm in models:
        i = problem.index(pm.name)
        share = pm.time_share if pm.time_share is not None else pm.decode_share
        out.append(
            next(
                c
                for c in table.options(i, size)
                if abs(c.share - share) < 1e-9 and abs(c.served - pm.served) <= 1e-9 * c.served
            )
        )
    return out


def _configs(problem: Problem, table: CandidateTable, plan: Placement) -> list[Config]:
    return [Config(m.size, tuple(_cands(problem, table, m.size, m.models))) for m in plan.meshes]


def _from_configs(
    problem: Problem,
    table: CandidateTable,
    configs: list[Config],
    counts: dict[tuple[int, ...], int],
) -> Placement:
    patterns = list(counts)
    free = positions(patterns, [counts[p] for p in patterns])
    meshes = [(*free[cfg.size].pop(0), list(cfg.cands)) for cfg in configs]
    return assemble(problem, table, "ilp", meshes, solve_time_s=0.0, status="heuristic")


# ---- the compact program ----------------------------------------------------------------
@dataclass
class _Compact:
    """The program and the handles needed to read a solution back."""

    prob: pulp.LpProblem
    x: dict[tuple[int, int, int, int], pulp.LpVariable]  # (model, size, rep, cand idx)
    n: dict[int, pulp.LpVariable]  # node pattern index -> how many nodes use it
    served: pulp.LpAffineExpression
    ratio: dict[int, pulp.LpAffineExpression]  # model -> served / requested
    patterns: list[tuple[int, ...]]
    order: list[int]  # representative order of the models


def _compact(
    problem: Problem,
    table: CandidateTable,
    start_plan: Placement | None,
    bound: float | None,
    objective: Objective,
    time_limit: float,
    solver: str,
    progress: Progress | None,
    threads: int | None,
) -> tuple[Placement | None, float | None]:
    """Solve the compact program; returns its plan (None: infeasible) and its bound."""
    t0 = time.perf_counter()
    m = _build(problem, table)
    first = None
    if start_plan is not None:
        _set_start(m, problem, table, start_plan)
    if bound is not None:
        m.prob += m.served <= bound * (1 + 1e-9) + 1e-9, "bound"
    if objective == "fair":
        theta = pulp.LpVariable("theta", 0, 1)
        for ratio in m.ratio.values():
            m.prob += theta <= ratio
        m.prob.setObjective(theta)
        if start_plan is not None:
            theta.setInitialValue(start_plan.fairness())
        try:
            first = run_solver(m.prob, solver, time_limit / 2, progress, threads, "ilp (fairness)")
        except RuntimeError:
            return None, None
        m.prob += theta >= (theta.value() or 0.0) - 1e-7, "fairness"
        time_limit = max(time_limit - (time.perf_counter() - t0), 1.0)
        _set_start(m, problem, table, _plan(m, problem, table))
    m.prob.setObjective(m.served)
    try:
        result = run_solver(m.prob, solver, time_limit, progress, threads, "ilp")
    except RuntimeError:
        return None, None
    if objective == "fair" and (first is None or not first.optimal):
        return _plan(m, problem, table), None  # the fairness level itself is not proven
    return _plan(m, problem, table), result.bound


def _plan(m: _Compact, problem: Problem, table: CandidateTable) -> Placement:
    return assemble(problem, table, "ilp", _decode(m, table), solve_time_s=0.0, status="")


def _build(problem: Problem, table: CandidateTable) -> _Compact:
    prob = pulp.LpProblem("placement", pulp.LpMaximize)
    order = sorted(
        range(problem.num_models), key=lambda i: (-min(table.sizes(i)), -problem.targets[i].rate, i)
    )
    patterns = node_patterns(problem.cluster.gpus_per_node, problem.mesh_sizes)
    n = {
        k: pulp.LpVariable(f"n{k}", 0, problem.cluster.nodes, cat=pulp.LpInteger)
        for k in range(len(patterns))
    }
    prob += pulp.lpSum(n.values()) <= problem.cluster.nodes, "nodes"
    x: dict[tuple[int, int, int, int], pulp.LpVariable] = {}
    per_model: dict[int, list[tuple[pulp.LpVariable, Candidate]]] = {i: [] for i in order}
    cap = table.capacity.as_tuple()
    for s in problem.mesh_sizes:
        eligible = [i for i in order if table.options(i, s)]
        opens = []
        for a, r in enumerate(eligible):
            slot: dict[int, list[tuple[pulp.LpVariable, Candidate]]] = {}
            for i in eligible[a:]:
                slot[i] = []
                for li, c in enumerate(table.options(i, s)):
                    v = pulp.LpVariable(f"x_{i}_{s}_{r}_{li}", cat=pulp.LpBinary)
                    x[(i, s, r, li)] = v
                    slot[i].append((v, c))
                    per_model[i].append((v, c))
            is_open = pulp.LpAffineExpression([(v, 1) for v, _ in slot[r]])
            opens.append(is_open)
            for i in eligible[a + 1 :]:
                prob += pulp.LpAffineExpression([(v, 1) for v, _ in slot[i]]) <= is_open
            for k, name in enumerate(RESOURCES):
                terms = [(v, c.use[k]) for vc in slot.values() for v, c in vc if c.use[k] > 0]
                if terms:
                    prob += pulp.LpAffineExpression(terms) <= cap[k] * is_open, f"{name}_{s}_{r}"
        if opens:
            supply = pulp.lpSum(cnt * n[k] for k, p in enumerate(patterns) if (cnt := p.count(s)))
            prob += pulp.lpSum(opens) <= supply, f"meshes_{s}"
    for i, vs in per_model.items():
        prob += pulp.LpAffineExpression([(v, 1) for v, _ in vs]) == 1, f"assign_{i}"
    served = pulp.LpAffineExpression([(v, c.served) for vs in per_model.values() for v, c in vs])
    ratio = {
        i: pulp.LpAffineExpression([(v, c.served / problem.targets[i].rate) for v, c in vs])
        for i, vs in per_model.items()
    }
    return _Compact(prob, x, n, served, ratio, patterns, order)


def _set_start(m: _Compact, problem: Problem, table: CandidateTable, plan: Placement) -> None:
    """Give the solver a feasible start so it never returns a worse plan."""
    for v in m.x.values():
        v.setInitialValue(0)
    pos = {i: k for k, i in enumerate(m.order)}
    for mesh in plan.meshes:
        cands = _cands(problem, table, mesh.size, mesh.models)
        rep = min((c.model for c in cands), key=lambda i: pos[i])
        for c in cands:
            li = table.options(c.model, mesh.size).index(c)
            m.x[(c.model, mesh.size, rep, li)].setInitialValue(1)
    used = [
        [mesh.size for mesh in plan.meshes if mesh.node == node]
        for node in range(problem.cluster.nodes)
    ]
    for k, count in enumerate(pattern_counts(m.patterns, used)):
        m.n[k].setInitialValue(count)


def _decode(m: _Compact, table: CandidateTable) -> list[tuple[int, tuple[int, ...], list]]:
    """Slots with their candidates, placed on the meshes the chosen patterns make."""
    slots: dict[tuple[int, int], list[Candidate]] = {}
    for (i, s, r, li), v in m.x.items():
        if (v.value() or 0) > 0.5:
            slots.setdefault((s, r), []).append(table.options(i, s)[li])
    free = positions(m.patterns, [round(m.n[k].value() or 0) for k in range(len(m.patterns))])
    return [(*free[s].pop(0), cands) for (s, _), cands in sorted(slots.items())]
