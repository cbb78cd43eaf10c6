"""Brute force: the best placement by enumerating every mesh split, assignment and level."""

from __future__ import annotations

import itertools
from functools import cache

from placement.candidates import CandidateTable
from placement.mesh_groups import cluster_groups, node_patterns
from placement.problem import Problem


def best_placement(problem: Problem, table: CandidateTable) -> float:
    """The largest total served rate of any feasible placement (every model placed)."""
    n = problem.num_models

    @cache
    def mesh_best(size: int, models: frozenset[int]) -> float | None:
        """Best served total of these models on one mesh, or None if they cannot share it."""
        if not models:
            return 0.0
        options = [table.options(i, size) for i in sorted(models)]
        best = None
        for combo in itertools.product(*options):
            if table.fits(combo):
                total = sum(c.served for c in combo)
                best = total if best is None or total > best else best
        return best

    patterns = node_patterns(problem.cluster.gpus_per_node, problem.mesh_sizes)
    best = float("-inf")
    for group in cluster_groups(problem.cluster.nodes, patterns):
        sizes = [s for pattern in group for s in pattern]
        for assign in itertools.product(range(len(sizes)), repeat=n):
            total = 0.0
            for k, size in enumerate(sizes):
                value = mesh_best(size, frozenset(i for i in range(n) if assign[i] == k))
                if value is None:
                    break
                total += value
            else:
                best = max(best, total)
    return best


def greedy_over_groups(problem: Problem, table: CandidateTable) -> float | None:
    """The paper's greedy run on every mesh group one by one (the enumeration `greedy` avoids):
    the best total, or None if no group hosts every model."""
    order = sorted(
        range(problem.num_models),
        key=lambda i: (
            -problem.targets[i].rate * problem.specs[i].flops_per_token(),
            -problem.specs[i].weight_bytes,
            i,
        ),
    )

    def preferred_first(i: int, size: int) -> list:
        opts = list(table.options(i, size))
        meeting = [c for c in opts if c.served >= problem.targets[i].rate * (1 - 1e-9)]
        first = min(meeting, key=lambda c: c.share) if meeting else opts[0]
        return [first, *[c for c in opts if c is not first]]

    choices = {(i, s): preferred_first(i, s) for i in order for s in table.sizes(i)}
    cap = table.capacity.as_tuple()
    best = None
    patterns = node_patterns(problem.cluster.gpus_per_node, problem.mesh_sizes)
    for combo in cluster_groups(problem.cluster.nodes, patterns):
        sizes = [s for pattern in combo for s in pattern]
        used = [[0.0] * 4 for _ in sizes]
        load = [0.0] * len(sizes)
        total = 0.0
        for i in order:
            compute = problem.targets[i].rate * problem.specs[i].flops_per_token()
            pick = None  # (served, -size, k, cand)
            for k in sorted(range(len(sizes)), key=lambda k: (load[k], used[k][0])):
                for c in choices.get((i, sizes[k]), ()):
                    if all(used[k][r] + c.use[r] <= cap[r] * (1 + 1e-9) + 1e-9 for r in range(4)):
                        if (
                            pick is None
                            or c.served > pick[0] + 1e-9
                            or (abs(c.served - pick[0]) <= 1e-9 and sizes[k] < -pick[1])
                        ):
                            pick = (c.served, -sizes[k], k, c)
                        break
            if pick is None:
                break
            _, _, k, c = pick
            for r in range(4):
                used[k][r] += c.use[r]
            load[k] += compute / sizes[k]
            total += c.served
        else:
            best = total if best is None or total > best + 1e-9 else best
    return best
