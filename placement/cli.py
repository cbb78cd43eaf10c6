"""`muxserve plan`: place models on GPUs, print the plan per mesh, write it as a config.

    muxserve plan --models M.yaml --cluster C.yaml --workload W.yaml
        [--algorithm ilp|greedy|muxserve|spatial|temporal|all] [--out plan.yaml]
        [--simulate [--contention shared|start|none|peak]]
        [--time-limit S] [--replicas N] [--plot FILE.png]
        [--current PLAN.yaml [--move-cost S|auto] [--horizon S]]

The plan written by `--out` is a serving config (`muxserve serve --config plan.yaml`). With
`--algorithm all`, it is the ILP's plan. With `--current`, re-planning: a plan that moves
models is taken only if what it gains over `--horizon` seconds outweighs the moves' load
times, else the current placement is kept (placement/migration.py states the rule).
"""

from __future__ import annotations

import argparse
import sys

from muxserve.config import dump_config, load_config
from muxserve.errors import ConfigError
from placement.algorithms import ALGORITHMS, SolveOptions, solve
from placement.contention import CONTENTION_MODES
from placement.deadline import Deadline
from placement.greedy import stderr_progress
from placement.ilp_solver import SOLVERS
from placement.migration import current_from_config
from placement.plan import Placement, to_config
from placement.problem import Problem, load_problem
from placement.report import format_comparison, format_placement, plot
from placement.simulator import SimResult, simulate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `plan` subcommand's options."""
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--models", required=True, help="models file (YAML: models:, engine:)")
    io.add_argument(
        "--cluster",
        required=True,
        help="cluster file (YAML: gpu:, nodes:, ...), or ray[:ADDRESS] to read the nodes and "
        "GPUs of a running Ray cluster",
    )
    io.add_argument("--workload", required=True, help="workload file (YAML: rates, lengths, SLO)")
    io.add_argument("--out", help="write the plan here as a serving config (YAML)")
    io.add_argument("--plot", metavar="FILE.png", help="plot throughput and SLO per algorithm")
    alg = parser.add_argument_group("algorithm")
    alg.add_argument("--algorithm", choices=[*ALGORITHMS, "all"], default="ilp")
    alg.add_argument(
        "--objective",
        choices=["throughput", "fair"],
        default="throughput",
        help="ILP: total served rate, or max-min fairness then total",
    )
    alg.add_argument(
        "--time-limit",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds for the whole plan: reading the inputs, every algorithm asked for and "
        "the ILP's search, which gets what the others leave (default 60; --simulate is extra)",
    )
    alg.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="N",
        help="place a model its smallest mesh cannot serve on up to N meshes, its rate split "
        "between them (default: the cluster file's planner.max_replicas, 1)",
    )
    alg.add_argument(
        "--gap",
        type=float,
        default=1e-3,
        help="ILP: stop within this relative gap of optimal (default 0.001)",
    )
    alg.add_argument(
        "--solver",
        choices=("auto", *SOLVERS),
        default="auto",
        help="ILP: HiGHS where highspy is installed, else CBC (bundled with pulp) (default auto)",
    )
    alg.add_argument("--threads", type=int, default=None, help="ILP: solver threads")
    alg.add_argument(
        "--authors-index-bug",
        action="store_true",
        help="muxserve: keep the authors' indexing bug (a mesh's score looked up by its "
        "position in a re-sorted list); fixed by default",
    )
    mig = parser.add_argument_group("re-planning (migration cost)")
    mig.add_argument(
        "--current",
        metavar="PLAN.yaml",
        help="the plan serving now (a config written by --out): moving a model off it costs "
        "its load time, and a plan is kept only if its gain outweighs that",
    )
    mig.add_argument(
        "--move-cost",
        default="auto",
        metavar="S|auto",
        help="seconds to load a model where it moves to (auto: its weight bytes at 2 GB/s "
        "plus 0.5 s) (default auto)",
    )
    mig.add_argument(
        "--horizon",
        type=float,
        default=600.0,
        metavar="S",
        help="seconds a new plan is expected to hold: its gain counts over this (default 600)",
    )
    sim = parser.add_argument_group("simulation")
    sim.add_argument(
        "--simulate",
        action="store_true",
        help="replay the workload against each plan with the real scheduler",
    )
    sim.add_argument(
        "--duration",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds of arrivals to measure, after a warm-up (default 20)",
    )
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument(
        "--contention",
        choices=CONTENTION_MODES,
        default="shared",
        help="how jobs running at once slow each other: shared (SMs and HBM bandwidth, "
        "re-paced at every job's start and end), start (slowed once, at start: results "
        "before `shared`), none (each as if alone), peak (as shared, demands counted over the "
        "time a job moves bytes: a pessimistic bracket) (default shared)",
    )


def run(args: argparse.Namespace) -> int:
    """Plan, print, and write; bad input raises `ConfigError` (the CLI prints it)."""
    if args.time_limit <= 0:
        raise ConfigError(f"--time-limit must be positive, got {args.time_limit:g}")
    if args.horizon <= 0:
        raise ConfigError(f"--horizon must be positive, got {args.horizon:g}")
    _move_cost(args.move_cost)  # its own check, before the inputs are read
    if args.replicas is not None and not 1 <= args.replicas <= 16:
        raise ConfigError(f"--replicas must be within 1..16, got {args.replicas}")
    deadline = Deadline.after(args.time_limit)  # from here: reading the inputs counts too
    problem = load_problem(args.models, args.cluster, args.workload, deadline=deadline)
    names = ALGORITHMS if args.algorithm == "all" else (args.algorithm,)
    current = _current(args, problem)
    options = SolveOptions(
        current=current,
        move_cost_s=_move_cost(args.move_cost),
        horizon_s=args.horizon,
        time_limit=args.time_limit,
        gap=args.gap,
        solver=args.solver,
        objective=args.objective,
        threads=args.threads,
        max_replicas=args.replicas,
        authors_index_bug=args.authors_index_bug,
    )
    plans = solve(problem, names, options, progress=stderr_progress, deadline=deadline)
    sims: dict[str, SimResult] = {}
    if args.simulate:
        for name, plan in plans.items():
            sims[name] = simulate(
                plan,
                problem,
                window_s=args.duration,
                seed=args.seed,
                contention=args.contention,
                progress=stderr_progress,  # one line per mesh: simulations take a while
            )
    for name, plan in plans.items():
        print(format_placement(plan, sims.get(name)))
        print()
    if len(plans) > 1:
        print(format_comparison(plans, sims or None))
    if args.out:
        chosen = plans["ilp"] if "ilp" in plans else next(iter(plans.values()))
        dump_config(to_config(chosen, problem), args.out)
        print(f"wrote the {chosen.algorithm} plan to {args.out}", file=sys.stderr)
    if args.plot:
        plot(plans, sims or None, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _move_cost(value: str) -> float | None:
    """`--move-cost`: seconds, or None for "auto" (estimated per model from its weights)."""
    if value == "auto":
        return None
    try:
        cost = float(value)
    except ValueError:
        cost = -1.0
    if not cost >= 0:
        raise ConfigError(f"--move-cost must be 'auto' or non-negative seconds, got {value!r}")
    return cost


def _current(args: argparse.Namespace, problem: Problem) -> Placement | None:
    """`--current`: the placement the given serving config runs, or None."""
    if args.current is None:
        return None
    return current_from_config(load_config(args.current), problem)
