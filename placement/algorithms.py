"""The placement algorithms behind one call, so the CLI and scripts treat them alike.

One deadline covers them all: the candidate tables, the baselines, the greedy warm start and
the ILP draw on the same `time_limit` (the ILP gets what the others leave).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

from muxserve.errors import ConfigError
from placement.authors import solve_muxserve
from placement.baselines import solve_spatial
from placement.candidates import Mode, build_candidates
from placement.deadline import Deadline, PlanningTimeout
from placement.greedy import Progress, solve_greedy, solve_temporal, stderr_progress
from placement.ilp import Objective, solve_ilp
from placement.migration import against_current
from placement.plan import Placement
from placement.problem import Problem

ALGORITHMS = ("ilp", "greedy", "muxserve", "spatial", "temporal")


@dataclass(frozen=True)
class SolveOptions:
    """Knobs of the search; `time_limit` bounds the whole call (every algorithm asked for)."""

    time_limit: float = 60.0
    gap: float = 1e-3
    solver: str = "auto"  # the ILP's: HiGHS where highspy is installed, else CBC
    objective: Objective = "throughput"
    threads: int | None = None
    max_replicas: int | None = None  # None: the cluster file's planner.max_replicas
    authors_index_bug: bool = False  # muxserve: keep the authors' indexing bug (see authors.py)
    # re-planning (placement/migration.py): the placement running now; each plan is kept only
    # if its gain over `horizon_s` outweighs its moves' load times (`move_cost_s`: seconds for
    # every model, by name, or None to estimate them from the weights)
    current: Placement | None = None
    move_cost_s: float | Mapping[str, float] | None = None
    horizon_s: float = 600.0


def solve(
    problem: Problem,
    algorithms: tuple[str, ...] = ALGORITHMS,
    options: SolveOptions | None = None,
    progress: Progress | None = stderr_progress,
    deadline: Deadline | None = None,
) -> dict[str, Placement]:
    """Run the named algorithms; the ILP is warm-started from the greedy plan when both run.

    `deadline` (default: `options.time_limit` from now) is shared: the baselines first (each
    returns its best so far when its share runs out), then the greedy, then the ILP.
    """
    options = options or SolveOptions()
    deadline = deadline or Deadline.after(options.time_limit)
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        raise ValueError(f"unknown algorithms {unknown}; known: {', '.join(ALGORITHMS)}")
    plans: dict[str, Placement] = {}
    if "spatial" in algorithms:
        plans["spatial"] = solve_spatial(problem, deadline=deadline.fraction(0.1))
    if "muxserve" in algorithms:
        plans["muxserve"] = solve_muxserve(
            problem,
            fix_index_bug=not options.authors_index_bug,
            deadline=deadline.fraction(0.2),
        )
    if "temporal" in algorithms:
        plans["temporal"] = solve_temporal(
            problem, progress=progress, deadline=deadline.fraction(0.15)
        )
    if "greedy" in algorithms or "ilp" in algorithms:
        start = time.perf_counter()
        mux = build_candidates(
            problem, Mode.MUX, max_replicas=options.max_replicas, deadline=deadline
        )
        greedy: Placement | None = None
        try:
            greedy = solve_greedy(problem, mux, progress=progress, deadline=deadline.fraction(0.3))
        except PlanningTimeout:
            raise
        except ConfigError:
            if "greedy" in algorithms:
                raise
        if greedy is not None:
            greedy = replace(greedy, solve_time_s=time.perf_counter() - start)  # with the table
        if greedy is not None and "greedy" in algorithms:
            plans["greedy"] = greedy
        if "ilp" in algorithms:
            ilp = solve_ilp(
                problem,
                mux,
                objective=options.objective,
                gap_tolerance=options.gap,
                solver=options.solver,
                warm_start=greedy,
                progress=progress,
                threads=options.threads,
                deadline=deadline,
            )
            # the ILP's time includes the candidate table and the greedy plan it starts from
            plans["ilp"] = replace(ilp, solve_time_s=time.perf_counter() - start)
    if options.current is not None:
        plans = against_current(
            plans, problem, options.current, options.move_cost_s, options.horizon_s
        )
    return {a: plans[a] for a in algorithms}
