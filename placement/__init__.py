"""Placement: which models share which GPUs, and with which SM and KV shares.

Torch-free, so a plan can be made on a laptop. The pieces, in the order a plan is made:

- `specs`, `gpus`, `workload`: the three input files (models, cluster, workload) as types.
- `cost_model`, `profile_table`: latency of a prefill or decode job on a mesh at an SM share.
- `problem`: one planning instance; `candidates`: per (model, mesh size, SM level) what a
  model would serve and what it would use (memory, SM time, HBM time, SM admission).
- `ilp` (with `column_generation`, `configurations`), `greedy`, `baselines`: the
  algorithms, behind `algorithms.solve`; each returns a `plan.Placement`.
- `simulator`: replays a workload against a placement with the real scheduler.
- `report`, `cli`: tables, plots and the `muxserve plan` command.
"""

from __future__ import annotations

from placement.algorithms import ALGORITHMS, SolveOptions, solve
from placement.plan import PlacedMesh, PlacedModel, Placement, to_config
from placement.problem import Problem, load_problem, make_problem
from placement.simulator import SimResult, simulate

__all__ = [
    "ALGORITHMS",
    "PlacedMesh",
    "PlacedModel",
    "Placement",
    "Problem",
    "SimResult",
    "SolveOptions",
    "load_problem",
    "make_problem",
    "simulate",
    "solve",
    "to_config",
]
