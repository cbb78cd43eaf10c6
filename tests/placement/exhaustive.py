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
