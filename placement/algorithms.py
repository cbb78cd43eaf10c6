"""The four placement algorithms behind one call, so the CLI and scripts treat them alike."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from placement.baselines import solve_spatial
from placement.candidates import Mode, build_candidates
from placement.greedy import Progress, solve_greedy, solve_temporal, stderr_progress
from placement.ilp import Objective, solve_ilp
from placement.plan import Placement
from placement.problem import Problem

ALGORITHMS = ("ilp", "greedy", "spatial", "temporal")


@dataclass(frozen=True)
class SolveOptions:
    """Knobs of the ILP (the others have none)."""

    time_limit: float = 60.0
    gap: float = 1e-3
    solver: str = "cbc"
    objective: Objective = "throughput"
    threads: int | None = None


def solve(
    problem: Problem,
    algorithms: tuple[str, ...] = ALGORITHMS,
    options: SolveOptions | None = None,
    progress: Progress | None = stderr_progress,
) -> dict[str, Placement]:
    """Run the named algorithms; the ILP is warm-started from the greedy plan when both run."""
    options = options or SolveOptions()
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        raise ValueError(f"unknown algorithms {unknown}; known: {', '.join(ALGORITHMS)}")
    plans: dict[str, Placement] = {}
    if "greedy" in algorithms or "ilp" in algorithms:
        start = time.perf_counter()
        mux = build_candidates(problem, Mode.MUX)
        greedy = solve_greedy(problem, mux, progress=progress)
        greedy = replace(greedy, solve_time_s=time.perf_counter() - start)  # with the table
        if "greedy" in algorithms:
            plans["greedy"] = greedy
        if "ilp" in algorithms:
            ilp = solve_ilp(
                problem,
                mux,
                objective=options.objective,
                time_limit=options.time_limit,
                gap_tolerance=options.gap,
                solver=options.solver,
                warm_start=greedy,
                progress=progress,
                threads=options.threads,
            )
            # the ILP's time includes the greedy plan it starts from
            plans["ilp"] = replace(ilp, solve_time_s=ilp.solve_time_s + greedy.solve_time_s)
    if "spatial" in algorithms:
        plans["spatial"] = solve_spatial(problem)
    if "temporal" in algorithms:
        plans["temporal"] = solve_temporal(problem, progress=progress)
    return {a: plans[a] for a in algorithms}
