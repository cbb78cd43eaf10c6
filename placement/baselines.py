"""Baselines: spatial partitioning (dedicated GPUs per model) and temporal multiplexing.

Spatial gives each model its own mesh, the smallest that holds it, running one job at a time
as a single-model server would; GPUs left over then go, a doubling at a time, to the model
that gains the most served rate from them, so the baseline uses the whole cluster as the
paper's spatial configs do. Temporal is in `greedy.solve_temporal`.
"""

from __future__ import annotations

import time

from muxserve.errors import ConfigError
from placement.candidates import Candidate, CandidateTable, Mode, build_candidates
from placement.deadline import Deadline
from placement.greedy import solve_temporal
from placement.plan import Placement, assemble
from placement.problem import Problem

__all__ = ["solve_spatial", "solve_temporal"]


def solve_spatial(
    problem: Problem, table: CandidateTable | None = None, *, deadline: Deadline | None = None
) -> Placement:
    """Each model alone on its own mesh; spare GPUs to whoever gains most (until `deadline`)."""
    start = time.perf_counter()
    deadline = deadline or Deadline.never()
    table = table or build_candidates(problem, Mode.TEMPORAL, max_replicas=1, deadline=deadline)
    best = {(i, s): _alone(table, i, s) for i in range(problem.num_models) for s in table.sizes(i)}
    sizes = {
        i: min(s for (j, s), c in best.items() if j == i and c) for i in range(problem.num_models)
    }
    nodes = _pack(problem, sizes)
    if nodes is None:
        need = sum(sizes.values())
        raise ConfigError(
            f"spatial: the {problem.num_models} models need at least {need} GPUs on their own "
            f"meshes; the cluster has {problem.cluster.num_gpus}"
        )
    while not deadline.passed():
        gains = []
        for i, s in sizes.items():
            bigger = [t for t in problem.mesh_sizes if t > s and best.get((i, t))]
            if not bigger:
                continue
            t = bigger[0]
            gain = best[(i, t)].served - best[(i, s)].served  # type: ignore[union-attr]
            if gain > 1e-9 and _pack(problem, {**sizes, i: t}) is not None:
                gains.append((gain / (t - s), -i, t))
        if not gains:
            break
        _, neg_i, t = max(gains)
        sizes[-neg_i] = t
    packed = _pack(problem, sizes)
    assert packed is not None
    meshes = [(node, gpus, [best[(i, len(gpus))]]) for i, (node, gpus) in packed.items()]
    return assemble(
        problem,
        table,
        "spatial",
        meshes,  # type: ignore[arg-type]
        solve_time_s=time.perf_counter() - start,
        status="heuristic",
    )


def _alone(table: CandidateTable, i: int, size: int) -> Candidate | None:
    """The candidate serving the most when the model has the mesh to itself."""
    return next((c for c in table.options(i, size) if table.fits([c])), None)


def _pack(problem: Problem, sizes: dict[int, int]) -> dict[int, tuple[int, tuple[int, ...]]] | None:
    """Meshes of the given sizes on nodes, largest first, at aligned consecutive GPU ids."""
    gpn = problem.cluster.gpus_per_node
    free = [0] * problem.cluster.nodes  # next free GPU id per node
    out: dict[int, tuple[int, tuple[int, ...]]] = {}
    for i in sorted(sizes, key=lambda i: (-sizes[i], i)):
        s = sizes[i]
        node = next((n for n in range(len(free)) if free[n] + s <= gpn), None)
        if node is None:
            return None
        out[i] = (node, tuple(range(free[node], free[node] + s)))
        free[node] += s
    return out
