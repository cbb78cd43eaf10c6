"""A plan by nodes: deal the models out to the nodes, then plan each node exactly.

At cluster scale (64 models on 8 nodes) the configuration LP's pricing does not converge
within a minute, but a node's share of the models (8 of them) is a small instance that
branch and price solves in about a second. Nodes are identical, so a good split of the models
between them is one where each node gets a similar mix: the models, most requested first,
are dealt out in a snake order (0, 1, …, n−1, n−1, …, 0, 0, 1, …), which gives every node
one of the hottest models, one of the next, and so on down to the coldest. Each node's models
are then planned on that node alone (branch and price over its configurations, bounded by
work); the local search (`local_search`) then moves models between nodes.

One deal is a guess. Every node search's configurations go into one `ColumnPool`, whose
integer master combines the best meshes found into one plan, and two steps then add meshes
to the pool, each followed by the master again: "replan" plans each node of the best plan
exactly, from its own meshes (so never worse), and "grow" prices the pool against its own
LP's duals over small groups of models (every deal's node groups). On the 64-model instance
the snake deal alone gives 570.5 req/s, its pool 581.1, then replan 586.4, grow 591.8,
replan 594.6 (~28 CPU-s). Other deals shift each round of the rate order by a fixed number
of nodes (round r's k-th model to node k + r·d); searching five of them gave 590.9 in as
much time.

Only replica 0 of each model is dealt out; the local search places further replicas where
they fit. Deterministic: the split depends on the rates alone, each node's search on counts
(unless the deadline cuts it, which the caller notes).
"""

from __future__ import annotations

from collections.abc import Callable

from placement.candidates import CandidateTable
from placement.column_generation import BranchAndPrice
from placement.column_pool import ColumnPool
from placement.configurations import Config
from placement.deadline import Deadline
from placement.instance import Instance
from placement.master import Incumbent
from placement.mesh_groups import MeshPacker

# a node's search: small, and bounded by work so that the split plan is the same every run
NODE_SEARCH_NODES = 10  # search nodes
NODE_ROUNDS = 30  # pricing rounds per search node
NODE_PRICING = 3000  # branch-and-bound nodes per pricing call
# the deals tried, in order: None is the snake, an int d shifts round r by r·d nodes. On
# 64/64 alone: snake 570.5 req/s, shifts 0-7: 564.0 551.2 532.3 563.1 571.2 577.7 576.4
# 565.6; their pool: snake 581.1, + 5: 585.5, + 3: 586.7, + 1: 589.7, + 7: 590.9, + 6: 592.1.
# The steps below buy more per CPU-second than further deals (each ~6.5 CPU-s)
DEALS: tuple[int | None, ...] = (None,)
# after the deals' pool is combined, each step adds meshes to the pool and combines it again
# from the best plan: "replan" re-plans each node of that plan exactly (from its meshes),
# "grow" prices the pool against its own LP's duals over groups of models. On 64/64 (snake
# deal): 581.1 → replan 586.4 → grow 591.8 → replan 594.6 req/s in ~28 CPU-s, where five
# deals gave 590.9 in ~35. Measured alternatives (CPU-s of the whole plan): a fourth step,
# replan or grow, adds nothing (34, 36); snake + 5 with the same steps 594.1 (35); with
# 4 pool rounds a grow instead of 2: 594.2 (35), 3 rounds 593.7 (32), 1 round 591.2 (26)
STEPS: tuple[str, ...] = ("replan", "grow", "replan")
SEARCH_SHARE = 0.85  # of the time left: the rest is the pool's integer master's

Groups = list[list[tuple[int, int]]]


def deal(table: CandidateTable, shift: int | None = None) -> Groups:
    """The models (replica 0) split between the nodes, most requested first: in snake order
    (`shift` None), or round r's k-th model to node (k + r·shift) mod n."""
    p = table.problem
    n = p.cluster.nodes
    order = sorted(range(p.num_models), key=lambda i: (-p.targets[i].rate, i))
    groups: Groups = [[] for _ in range(n)]
    for k, i in enumerate(order):
        if shift is None:
            r = k % (2 * n)
            groups[r if r < n else 2 * n - 1 - r].append((i, 0))
        else:
            r, j = divmod(k, n)
            groups[(j + r * shift) % n].append((i, 0))
    return groups


def plan_by_deals(
    table: CandidateTable,
    *,
    deadline: Deadline,
    pool: ColumnPool,
    deals: tuple[int | None, ...] | None = None,
    steps: tuple[str, ...] | None = None,
    threads: int | None = None,
    backend: str = "auto",
    progress: Callable[[str], None] | None = None,
    stats: dict[str, int] | None = None,
) -> tuple[Incumbent | None, bool]:
    """Each deal planned node by node, then the best plan the pool of all their meshes
    makes, improved by `steps` (default `STEPS`: "replan" or "grow", each followed by the
    pool's master again); (None, _) if no deal's nodes hold their models. The flag says
    whether the deadline cut the work short (a deal or step not tried counts). The pool's
    master runs even when the deals were cut, on what they found."""
    for step in steps or ():
        if step not in ("replan", "grow"):
            raise ValueError(f"unknown step {step!r}: choose replan or grow")
    searching = deadline.fraction(SEARCH_SHARE)
    best: Incumbent | None = None
    cut = False
    seen: list[Groups] = []
    for shift in DEALS if deals is None else deals:
        groups = deal(table, shift)
        if any(_same_split(groups, g) for g in seen):
            continue  # with few nodes two shifts may deal alike
        if searching.passed():
            cut = True
            break
        seen.append(groups)
        found, cut_here = plan_by_nodes(table, deadline=searching, threads=threads,
                                        backend=backend, progress=progress, stats=stats,
                                        groups=groups, pool=pool)  # fmt: skip
        cut = cut or cut_here
        if found is not None and (best is None or found.value > best.value + 1e-9):
            best = found
    if deadline.passed():
        return best, True
    best = pool.combine(table, best, deadline=deadline, threads=threads, backend=backend)
    for step in STEPS if steps is None else steps:
        if best is None:
            break
        if searching.passed():
            cut = True  # a step not taken counts, as a deal not tried does
            break
        if step == "replan":  # each node of the plan re-planned exactly, from its meshes
            groups, starts = _nodes_of(table, best)
            _, cut_here = plan_by_nodes(table, deadline=searching, threads=threads,
                                        backend=backend, stats=stats, groups=groups, pool=pool,
                                        starts=starts)  # fmt: skip
        elif step == "grow":  # the pool priced against its own LP's duals, over groups
            cut_here = pool.grow(table, pricing_groups(table, best), deadline=searching,
                                 threads=threads, backend=backend, stats=stats)  # fmt: skip
        cut = cut or cut_here
        best = pool.combine(table, best, deadline=deadline, threads=threads, backend=backend)
        if best is not None and progress:
            progress(f"ilp: {step}, then the pool combined: {best.value:.2f} req/s")
    if stats is not None:
        stats["pooled meshes"] = len(pool)
    cut = cut or deadline.passed()
    if best is not None and progress:
        progress(f"ilp: the meshes of {len(seen)} deals combined: {best.value:.2f} req/s")
    return best, cut


def pricing_groups(table: CandidateTable, best: Incumbent) -> list[list[int]]:
    """Groups of models for pricing the pool against its own LP's duals: every deal's
    node groups (the snake and every shift, searched or not) and the nodes of `best`, each
    group once, in that order. Pricing a group of 8 costs a few milliseconds where pricing
    all 64 models does not finish, and the deals mix models of every rate."""
    n = table.problem.cluster.nodes
    out: list[list[int]] = []
    for shift in (None, *range(n)):
        out += [sorted({i for i, _ in g}) for g in deal(table, shift)]
    p = table.problem
    nodes = MeshPacker(n, p.cluster.gpus_per_node, p.mesh_sizes).by_node(best.configs)
    if nodes is not None:
        out += [sorted({c.model for cfg in node for c in cfg.cands}) for node in nodes]
    unique = dict.fromkeys(tuple(g) for g in out if g)  # each once, first seen first
    return [list(g) for g in unique]


def _nodes_of(table: CandidateTable, plan: Incumbent) -> tuple[Groups, list[Incumbent]]:
    """`plan`'s meshes placed on the nodes: each node's units and its part of the plan."""
    p = table.problem
    n = p.cluster.nodes
    configs = MeshPacker(n, p.cluster.gpus_per_node, p.mesh_sizes).by_node(plan.configs)
    assert configs is not None  # the pool's plans are packed
    groups = [[(c.model, c.replica) for cfg in cs for c in cfg.cands] for cs in configs]
    return groups, [Incumbent(sum(c.served for c in cs), cs) for cs in configs]


def _same_split(a: Groups, b: Groups) -> bool:
    return sorted(map(sorted, a)) == sorted(map(sorted, b))


def plan_by_nodes(
    table: CandidateTable,
    *,
    deadline: Deadline,
    threads: int | None = None,
    backend: str = "auto",
    progress: Callable[[str], None] | None = None,
    stats: dict[str, int] | None = None,
    groups: Groups | None = None,
    pool: ColumnPool | None = None,
    starts: list[Incumbent] | None = None,
) -> tuple[Incumbent | None, bool]:
    """Each node's dealt models (`groups`, default the snake deal) planned on it, from
    its `starts` plan where given (never worse); (None, _) if some node's models do not
    fit on it. The flag says whether the deadline cut a node's search short. Every
    configuration the searches price goes into `pool`."""
    configs: list[Config] = []
    cut = False
    groups = deal(table) if groups is None else groups
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
        found = bp.search(
            None if starts is None else starts[node], deadline=deadline, tolerance=1e-4
        )
        if pool is not None:
            pool.add(bp.configs)
        cut = cut or deadline.passed() or found.root_cut
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
