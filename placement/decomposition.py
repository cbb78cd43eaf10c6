"""A plan by nodes: deal the models out to the nodes, then plan each node exactly.

At cluster scale (64 models on 8 nodes) the configuration LP's pricing does not converge
within a minute, but a node's share of the models (8 of them) is a small instance that
branch and price solves in about a second. Nodes are identical, so a good split of the models
between them is one where each node gets a similar mix: the models, most requested first,
are dealt out in a snake order (0, 1, …, n−1, n−1, …, 0, 0, 1, …), which gives every node
one of the hottest models, one of the next, and so on down to the coldest. Each node's models
are then planned on that node alone (branch and price over its configurations, bounded by
work); the local search (`local_search`) then moves models between nodes.

Only replica 0 of each model is dealt out; the local search places further replicas where
they fit. Deterministic: the split depends on the rates alone, each node's search on counts
(unless the deadline cuts it, which the caller notes).
"""

from __future__ import annotations

from collections.abc import Callable

from placement.candidates import CandidateTable
from placement.column_generation import BranchAndPrice, Incumbent, Instance
from placement.configurations import Config
from placement.deadline import Deadline

# a node's search: small, and bounded by work so that the split plan is the same every run
NODE_SEARCH_NODES = 10  # search nodes
NODE_ROUNDS = 30  # pricing rounds per search node
NODE_PRICING = 3000  # branch-and-bound nodes per pricing call


def deal(table: CandidateTable) -> list[list[tuple[int, int]]]:
    """The models (replica 0) split between the nodes, most requested first, snake order."""
    p = table.problem
    n = p.cluster.nodes
    order = sorted(range(p.num_models), key=lambda i: (-p.targets[i].rate, i))
    groups: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    for k, i in enumerate(order):
        r = k % (2 * n)
        groups[r if r < n else 2 * n - 1 - r].append((i, 0))
    return groups


def plan_by_nodes(
    table: CandidateTable,
    *,
    deadline: Deadline,
    threads: int | None = None,
    backend: str = "auto",
    progress: Callable[[str], None] | None = None,
    stats: dict[str, int] | None = None,
) -> tuple[Incumbent | None, bool]:
    """Each node's dealt models planned on it; (None, _) if some node's models do not fit on
    it. The flag says whether the deadline cut a node's search short."""
    configs: list[Config] = []
    cut = False
    groups = deal(table)
    for node, units in enumerate(groups):
        if not units:
            continue
        if deadline.passed():
            return None, True
        bp = BranchAndPrice(
            Instance(table, tuple(units), 1, {}),
            threads=threads,
            backend=backend,
            label=f"ilp (node {node})",
            max_nodes=NODE_SEARCH_NODES,
            max_rounds=NODE_ROUNDS,
            pricing_nodes=NODE_PRICING,
            mip_limit_s=0.0,
        )
        found = bp.search(None, deadline=deadline, tolerance=1e-4)
        cut = cut or deadline.passed()
        if stats is not None:
            stats["node searches"] = stats.get("node searches", 0) + 1
            stats["pricing rounds"] = stats.get("pricing rounds", 0) + found.rounds
        if found.best is None:
            return None, cut
        configs += found.best.configs
        if progress:
            so_far = sum(c.served for c in configs)
            progress(f"ilp: node by node, {node + 1} of {len(groups)} planned, {so_far:.2f} req/s")
    return Incumbent(sum(c.served for c in configs), configs), cut
