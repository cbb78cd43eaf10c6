"""The paper's placement algorithm (MuxServe, Alg. 1), as a baseline for the ILP.

Enumerate mesh groups (how every node splits into meshes); for each, place models one by one
in decreasing order of rate × compute, each on the mesh where it adds the most estimated
throughput; keep the group with the largest total. A model's SM share on a mesh size is fixed
up front, as in the paper's code: the least share whose capacity meets its rate, else the
share with the largest capacity. One addition: where that share does not fit on a mesh, a
smaller share that fits is tried, so an overloaded cluster still gets a plan.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from muxserve.errors import ConfigError
from placement.candidates import Candidate, CandidateTable, Mode, build_candidates
from placement.mesh_groups import cluster_groups, layout, node_patterns
from placement.plan import Placement, assemble
from placement.problem import Problem

Progress = Callable[[str], None]


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def solve_greedy(
    problem: Problem,
    table: CandidateTable | None = None,
    *,
    mode: Mode = Mode.MUX,
    algorithm: str = "greedy",
    progress: Progress | None = stderr_progress,
    progress_after_s: float = 2.0,
) -> Placement:
    """The best greedy placement over all mesh groups."""
    start = time.perf_counter()
    table = table or build_candidates(problem, mode)
    order = sorted(
        range(problem.num_models),
        key=lambda i: (
            -problem.targets[i].rate * problem.specs[i].flops_per_token(),
            -problem.specs[i].weight_bytes,
            i,
        ),
    )
    choices = {(i, s): _preferred_first(table, i, s) for i in order for s in table.sizes(i)}
    patterns = node_patterns(problem.cluster.gpus_per_node, problem.mesh_sizes)
    groups = list(cluster_groups(problem.cluster.nodes, patterns))
    best: tuple[float, list[tuple[int, tuple[int, ...], list[Candidate]]]] | None = None
    last_report = start
    for g, combo in enumerate(groups):
        meshes = [(node, gpus) for node, pat in enumerate(combo) for gpus in layout(pat)]
        placed = _place(problem, table, order, choices, meshes)
        if placed is not None:
            total = sum(c.served for _, _, cands in placed for c in cands)
            if best is None or total > best[0] + 1e-9:
                best = (total, placed)
        now = time.perf_counter()
        if progress and now - start > progress_after_s and now - last_report > 1.0:
            last_report = now
            shown = "none yet" if best is None else f"{best[0]:.2f} req/s"
            progress(f"{algorithm}: {g + 1}/{len(groups)} mesh groups, best {shown}")
    if best is None:
        raise ConfigError(
            f"{algorithm}: no mesh group of the cluster can host all {problem.num_models} models "
            f"(weights and KV exceed memory); use a larger cluster or fewer models"
        )
    return assemble(
        problem,
        table,
        algorithm,
        best[1],
        solve_time_s=time.perf_counter() - start,
        status="heuristic",
    )


def _preferred_first(table: CandidateTable, i: int, size: int) -> list[Candidate]:
    """The paper's share for (model, size) first, then the rest by served rate."""
    opts = list(table.options(i, size))
    rate = table.problem.targets[i].rate
    meeting = [c for c in opts if c.served >= rate * (1 - 1e-9)]
    first = min(meeting, key=lambda c: c.share) if meeting else opts[0]
    return [first, *[c for c in opts if c is not first]]


def _place(
    problem: Problem,
    table: CandidateTable,
    order: list[int],
    choices: dict[tuple[int, int], list[Candidate]],
    meshes: list[tuple[int, tuple[int, ...]]],
) -> list[tuple[int, tuple[int, ...], list[Candidate]]] | None:
    """Greedy placement on one mesh group; None if some model fits nowhere."""
    cap = table.capacity.as_tuple()
    used = [[0.0] * 4 for _ in meshes]
    load = [0.0] * len(meshes)  # the paper's tag: compute placed per GPU
    hosted: list[list[Candidate]] = [[] for _ in meshes]
    for i in order:
        compute = problem.targets[i].rate * problem.specs[i].flops_per_token()
        best: tuple[float, int, int, Candidate] | None = None  # (gain, -size, k, cand)
        visit = sorted(range(len(meshes)), key=lambda k: (load[k], used[k][0]))
        for k in visit:
            size = len(meshes[k][1])
            for c in choices.get((i, size), ()):
                if all(used[k][r] + c.use[r] <= cap[r] * (1 + 1e-9) + 1e-9 for r in range(4)):
                    if (
                        best is None
                        or c.served > best[0] + 1e-9
                        or (abs(c.served - best[0]) <= 1e-9 and size < -best[1])
                    ):
                        best = (c.served, -size, k, c)
                    break
        if best is None:
            return None
        _, _, k, c = best
        hosted[k].append(c)
        for r in range(4):
            used[k][r] += c.use[r]
        load[k] += compute / len(meshes[k][1])
    return [(node, gpus, hosted[k]) for k, (node, gpus) in enumerate(meshes)]


def solve_temporal(problem: Problem, *, progress: Progress | None = stderr_progress) -> Placement:
    """Temporal multiplexing: models share meshes, one job at a time (the greedy's search)."""
    return solve_greedy(problem, mode=Mode.TEMPORAL, algorithm="temporal", progress=progress)
