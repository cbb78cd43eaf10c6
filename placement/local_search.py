"""Local search over a placement: re-plan two nodes at a time, exactly.

Free the meshes of two nodes and re-place their models (and any replica the plan left out)
on those two nodes with branch and price, the rest of the plan fixed: the two nodes may
split into other meshes, and their models change meshes, shares and service levels. A pass
visits every pair of nodes in a fixed order; passes repeat while one improves the plan.
Each sub-search is small (the paper's instance is one), so it is exact in well under a
second, and the whole search is deterministic unless the deadline cuts it short.
"""

from __future__ import annotations

from collections.abc import Callable

from placement.candidates import CandidateTable
from placement.column_generation import BranchAndPrice
from placement.configurations import Config
from placement.deadline import Deadline
from placement.instance import Instance
from placement.master import Incumbent
from placement.mesh_groups import MeshPacker

# one pair's search: bounded by work (a heuristic here; no proof needed)
PAIR_SEARCH_NODES = 20  # search nodes
PAIR_ROUNDS = 40  # pricing rounds per search node
PAIR_PRICING = 5000  # branch-and-bound nodes per pricing call


def improve(
    table: CandidateTable,
    start: Incumbent,
    *,
    deadline: Deadline,
    threads: int | None = None,
    backend: str = "auto",
    progress: Callable[[str], None] | None = None,
    max_passes: int = 3,
    stats: dict[str, int] | None = None,
) -> Incumbent:
    """A plan at least as good as `start`, found by re-planning pairs of nodes, each by a
    search bounded by work (`PAIR_*`), at most `max_passes` passes over the pairs."""
    problem = table.problem
    cl = problem.cluster
    if cl.nodes < 2:
        return start
    nodes = MeshPacker(cl.nodes, cl.gpus_per_node, problem.mesh_sizes).by_node(start.configs)
    if nodes is None:
        return start
    best = start.value
    for npass in range(max_passes):
        improved = False
        for a, b in _pairs(cl.nodes):
            if deadline.passed():
                return _incumbent(nodes)
            if stats is not None:
                stats["pairs"] = stats.get("pairs", 0) + 1
            better = _replan(table, nodes, (a, b), deadline, threads, backend)
            if better is not None:
                gain = sum(c.served for c in better[0] + better[1]) - sum(
                    c.served for c in nodes[a] + nodes[b]
                )
                if gain > 1e-7 * max(best, 1.0):
                    if stats is not None:
                        stats["improving pairs"] = stats.get("improving pairs", 0) + 1
                    nodes[a], nodes[b] = better
                    best += gain
                    improved = True
                    if progress:
                        progress(
                            f"ilp: local search pass {npass + 1}, nodes {a}+{b}: {best:.2f} req/s"
                        )
        if not improved:
            break
    return _incumbent(nodes)


def _pairs(n: int) -> list[tuple[int, int]]:
    """Every pair of nodes, nearest first: (0, 1), (1, 2), …, (n−1, 0), then (0, 2), …"""
    out = []
    for d in range(1, n // 2 + 1):
        for a in range(n if 2 * d < n else n // 2):
            out.append((a, (a + d) % n))
    return out


def _incumbent(nodes: list[list[Config]]) -> Incumbent:
    configs = [c for node in nodes for c in node]
    return Incumbent(sum(c.served for c in configs), configs)


def _replan(
    table: CandidateTable,
    nodes: list[list[Config]],
    pair: tuple[int, int],
    deadline: Deadline,
    threads: int | None,
    backend: str,
) -> tuple[list[Config], list[Config]] | None:
    """The best re-plan of two nodes with their models and the plan's left-out replicas."""
    problem = table.problem
    inside = [c for k in pair for cfg in nodes[k] for c in cfg.cands]
    outside = [
        c for k, node in enumerate(nodes) if k not in pair for cfg in node for c in cfg.cands
    ]
    placed = {(c.model, c.replica) for c in inside + outside}
    units = sorted({(c.model, c.replica) for c in inside} | (set(table.units) - placed))
    if not units:
        return None
    caps = {}
    for i in {i for i, _ in units if table.replicas(i) > 1}:
        elsewhere = sum(c.served for c in outside if c.model == i)
        caps[i] = max(problem.targets[i].rate - elsewhere, 0.0)
    inst = Instance(table, tuple(units), 2, caps)
    bp = BranchAndPrice(
        inst,
        threads=threads,
        backend=backend,
        label="ilp (local)",
        max_nodes=PAIR_SEARCH_NODES,
        mip_limit_s=0.0,  # a heuristic here: bounded work, no proof needed
        max_rounds=PAIR_ROUNDS,
        pricing_nodes=PAIR_PRICING,
    )
    start = Incumbent(
        sum(c.served for k in pair for c in nodes[k]), [*nodes[pair[0]], *nodes[pair[1]]]
    )
    found = bp.search(start, deadline=deadline, tolerance=1e-4)
    if found.best is None or found.best.value <= start.value + 1e-9:
        return None
    cl = problem.cluster
    two = MeshPacker(2, cl.gpus_per_node, problem.mesh_sizes).by_node(found.best.configs)
    return None if two is None else (two[0], two[1])
