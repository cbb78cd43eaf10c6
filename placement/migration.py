"""Planning against a current placement: what moving models costs, and when a move pays.

Re-planning while serving starts from a placement that is already running. A new plan is
only worth taking when what it gains outweighs the cost of getting there, so small drifts in
the rates move nothing. The rule (one place, `decide`):

- The current placement is re-evaluated under the new demand by the planner's own estimator
  (`evaluate`: on each of its meshes, the same models at the shares that serve the most
  now), so the two plans are compared on the same numbers.
- gain = served(new) - served(current), in requests/s; over the `horizon_s` the new plan
  is expected to hold (the re-planning interval), it serves `gain * horizon_s` more requests.
- Each move (a model placed on a mesh where it was not) costs its load time `c_m` (weights
  onto the devices: measured, or `estimate_move_cost_s` from the weight bytes), during which
  the destination mesh may serve nothing: `c_m * served(destination mesh in the new plan)`
  requests. A model leaving a mesh costs nothing: it drains where it is.
- The new plan is taken if and only if `gain * horizon_s - sum(costs) > 0`; otherwise the
  current placement is kept (with the new demand's served rates), and why is in its notes.

`muxserve plan --current PLAN.yaml` applies the rule to every algorithm's plan
(`SolveOptions.current`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from muxserve.config import MuxConfig
from muxserve.errors import ConfigError
from placement.candidates import (
    Candidate,
    CandidateTable,
    Capacity,
    Mode,
    build_candidates,
    room,
)
from placement.plan import PlacedMesh, PlacedModel, Placement, assemble
from placement.problem import Problem, Target
from placement.specs import PlannerModel

LOAD_BYTES_PER_S = 2e9  # weights read from a warm page cache and copied to the device, at least
LOAD_FIXED_S = 0.5  # a load's fixed cost: allocations, per-tensor overhead, the first step
_NODES_CAP = 20_000  # branch-and-bound nodes per mesh in `evaluate`

Location = tuple[int, tuple[int, ...]]  # (node, GPU ids): where a mesh is


@dataclass(frozen=True)
class Move:
    """Model `model` starts serving on the mesh at `to` (it was not there)."""

    model: str
    to: Location
    cost_s: float  # its load time
    cost_requests: float  # cost_s x the destination mesh's served rate in the new plan


@dataclass(frozen=True)
class Decision:
    """Keep the current placement or take the new one, and the numbers that decided it."""

    take: bool
    gain: float  # requests/s the new plan serves over the current one (re-evaluated)
    horizon_s: float
    moves: tuple[Move, ...]

    @property
    def cost(self) -> float:
        """Requests the moves cost (see the module's rule)."""
        return sum(m.cost_requests for m in self.moves)

    @property
    def net(self) -> float:
        """gain x horizon - cost, in requests: positive means move."""
        return self.gain * self.horizon_s - self.cost

    def reason(self) -> str:
        verdict = "take the new plan" if self.take else "keep the current placement"
        moved = ", ".join(f"{m.model} -> {m.to[0]}:{list(m.to[1])}" for m in self.moves)
        return (
            f"{verdict}: gain {self.gain:+.3f} req/s x {self.horizon_s:g} s = "
            f"{self.gain * self.horizon_s:+.1f} requests, {len(self.moves)} moves cost "
            f"{self.cost:.1f} requests{f' ({moved})' if moved else ''}, net {self.net:+.1f}"
        )


def estimate_move_cost_s(
    spec: PlannerModel,
    tp: int = 1,
    bytes_per_s: float = LOAD_BYTES_PER_S,
    fixed_s: float = LOAD_FIXED_S,
) -> float:
    """Seconds to load a model onto a mesh of `tp` GPUs: its weight bytes per GPU over the
    load bandwidth, plus a fixed cost. An estimate for when no load was measured."""
    if bytes_per_s <= 0 or fixed_s < 0:
        raise ValueError("the load bandwidth must be positive and the fixed cost not negative")
    return fixed_s + spec.weight_bytes / tp / bytes_per_s


def move_costs(
    problem: Problem, given: float | Mapping[str, float] | None = None
) -> dict[str, float]:
    """Each model's move cost in seconds: one number for all, a mapping by name (models it
    leaves out are estimated), or estimated from the weights (None)."""
    out = {}
    for s in problem.specs:
        if isinstance(given, (int, float)):
            out[s.name] = float(given)
        elif given is not None and s.name in given:
            out[s.name] = float(given[s.name])
        else:
            out[s.name] = estimate_move_cost_s(s)
    bad = {n: c for n, c in out.items() if not c >= 0}
    if bad:
        raise ConfigError(f"move costs must be non-negative seconds: {bad}")
    return out


def locations(placement: Placement) -> dict[str, set[Location]]:
    """Where each model of a placement is (one location per replica)."""
    out: dict[str, set[Location]] = {}
    for mesh in placement.meshes:
        for m in mesh.models:
            out.setdefault(m.name, set()).add((mesh.node, mesh.gpus))
    return out


def moves(current: Placement, new: Placement, cost_s: Mapping[str, float]) -> tuple[Move, ...]:
    """Every model placed by `new` on a mesh where `current` does not have it."""
    before = locations(current)
    out = []
    for mesh in new.meshes:
        where = (mesh.node, mesh.gpus)
        mesh_served = sum(m.served for m in mesh.models)
        for m in mesh.models:
            if where not in before.get(m.name, set()):
                c = cost_s.get(m.name, 0.0)
                out.append(Move(m.name, where, c, c * mesh_served))
    return tuple(sorted(out, key=lambda mv: (mv.model, mv.to)))


def decide(
    current: Placement, new: Placement, cost_s: Mapping[str, float], horizon_s: float
) -> Decision:
    """The module's rule: `current` must already be re-evaluated under the new demand."""
    if horizon_s <= 0:
        raise ValueError(f"the horizon must be positive, got {horizon_s:g} s")
    mv = moves(current, new, cost_s)
    d = Decision(False, new.served_total - current.served_total, horizon_s, mv)
    # no move: nothing to take (a plan that only drops models is no better than keeping them)
    return replace(d, take=bool(mv) and d.net > 0)


def choose(
    new: Placement,
    current: Placement,
    problem: Problem,
    cost_s: Mapping[str, float],
    horizon_s: float,
) -> tuple[Placement, Decision]:
    """The plan to run: `new` if the rule says it pays, else `current` re-evaluated; the
    chosen plan's notes say which and why."""
    kept = evaluate(current, problem)
    new = align(new, current)
    d = decide(kept, new, cost_s, horizon_s)
    chosen = new if d.take else replace(kept, algorithm=new.algorithm)
    return replace(chosen, notes=(*chosen.notes, f"migration: {d.reason()}")), d


def align(new: Placement, current: Placement) -> Placement:
    """`new` with its meshes of each size swapped among their own locations so that as many
    models as can stay where `current` has them (nodes are alike, so a plan is the same plan
    whichever mesh of a size holds which group). Exact up to 6 meshes of a size (every
    permutation), greedy by overlap beyond."""
    before = locations(current)
    by_size: dict[int, list[int]] = {}
    for k, mesh in enumerate(new.meshes):
        by_size.setdefault(mesh.size, []).append(k)
    where = {k: (m.node, m.gpus) for k, m in enumerate(new.meshes)}
    target = dict(where)

    def stay(k: int, loc: Location) -> int:
        return sum(1 for m in new.meshes[k].models if loc in before.get(m.name, set()))

    for ks in by_size.values():
        locs = [where[k] for k in ks]
        if len(ks) <= 6:
            best = max(
                itertools.permutations(locs),
                key=lambda perm: sum(stay(k, loc) for k, loc in zip(ks, perm, strict=True)),
            )
            target.update(zip(ks, best, strict=True))
        else:
            pairs = sorted(((stay(k, loc), k, loc) for k in ks for loc in locs), reverse=True)
            used_k: set[int] = set()
            used_loc: set[Location] = set()
            for _, k, loc in pairs:
                if k not in used_k and loc not in used_loc:
                    target[k] = loc
                    used_k.add(k)
                    used_loc.add(loc)
    meshes = tuple(
        replace(m, node=target[k][0], gpus=target[k][1]) for k, m in enumerate(new.meshes)
    )
    return replace(new, meshes=tuple(sorted(meshes, key=lambda m: (m.node, m.gpus))))


def against_current(
    plans: Mapping[str, Placement],
    problem: Problem,
    current: Placement,
    move_cost_s: float | Mapping[str, float] | None,
    horizon_s: float,
) -> dict[str, Placement]:
    """Each plan, or the current placement where moving to it does not pay (`choose`)."""
    costs = move_costs(problem, move_cost_s)
    return {a: choose(p, current, problem, costs, horizon_s)[0] for a, p in plans.items()}


def candidate_table(problem: Problem) -> CandidateTable:
    """The cost model's table `evaluate` reads, to share between evaluations of placements
    that host each model once (building it is most of an evaluation's time)."""
    return build_candidates(problem, Mode.MUX, max_replicas=1)


def evaluate(
    placement: Placement, problem: Problem, table: CandidateTable | None = None
) -> Placement:
    """`placement`'s meshes and models under `problem`'s demand: on each mesh the same models,
    each at the SM share and service level that serve the most together (the planner's
    candidates, so numbers compare with a new plan's). A model on k meshes gets 1/k of its
    rate on each; one that no longer fits its mesh is dropped, with a note. `table`
    (`candidate_table(problem)`) is used where every model is on one mesh."""
    names = {s.name: i for i, s in enumerate(problem.specs)}
    unknown = sorted({m.name for m in placement.models} - set(names))
    if unknown:
        raise ConfigError(f"the current placement has models the workload does not: {unknown}")
    copies: dict[str, int] = {}
    for m in placement.models:
        copies[m.name] = copies.get(m.name, 0) + 1
    split = replace(
        problem,
        targets=tuple(
            replace(t, rate=t.rate / copies.get(s.name, 1))
            for s, t in zip(problem.specs, problem.targets, strict=True)
        ),
    )
    if table is None or any(k > 1 for k in copies.values()):
        table = candidate_table(split)
    chosen, notes = [], []
    for mesh in placement.meshes:
        want = [names[m.name] for m in mesh.models]
        options = [table.options(i, mesh.size) for i in want]
        for i, opts in zip(want, options, strict=True):
            if not opts:
                notes.append(f"{problem.specs[i].name} no longer fits its mesh of {mesh.size}")
        best = _best_fit([o for o in options if o], table.capacity)
        chosen.append((mesh.node, mesh.gpus, best))
    out = assemble(
        split, table, "current", chosen, solve_time_s=0.0, status="evaluated", notes=tuple(notes)
    )
    rates = {s.name: t.rate for s, t in zip(problem.specs, problem.targets, strict=True)}
    return _with_rates(out, rates)


def _with_rates(p: Placement, rates: Mapping[str, float]) -> Placement:
    """The requested rates back to the whole model's (evaluation split them over replicas)."""
    meshes = tuple(
        replace(mesh, models=tuple(replace(m, rate=rates[m.name]) for m in mesh.models))
        for mesh in p.meshes
    )
    return replace(p, meshes=meshes)


def _best_fit(options: Sequence[Sequence[Candidate]], capacity: Capacity) -> list[Candidate]:
    """One candidate per model (or none, where it fits at no level) that fit together and
    serve the most: depth-first branch and bound over each model's options, most served
    first, with the uses summed as it goes; at most `_NODES_CAP` nodes (then the best found)."""
    n = len(options)
    cap = room(capacity)
    tops = [opts[0].served if opts else 0.0 for opts in options]
    rest = [sum(tops[k:]) for k in range(n + 1)]
    best: list[Candidate | None] = [None] * n
    best_val = -1.0
    pick: list[Candidate | None] = [None] * n
    nodes = 0

    def dfs(k: int, val: float, used: tuple[float, ...]) -> None:
        nonlocal best_val, nodes, best
        nodes += 1
        if val + rest[k] <= best_val + 1e-12 or nodes > _NODES_CAP:
            return
        if k == n:
            best_val, best = val, list(pick)
            return
        for c in options[k]:
            total = tuple(u + x for u, x in zip(used, c.use, strict=True))
            if all(t <= m for t, m in zip(total, cap, strict=True)):
                pick[k] = c
                dfs(k + 1, val + c.served, total)
        pick[k] = None  # leave it out: only when nothing of it fits beside the others
        dfs(k + 1, val, used)

    dfs(0, 0.0, (0.0, 0.0, 0.0, 0.0))
    return [c for c in best if c is not None]


def current_from_config(config: MuxConfig, problem: Problem) -> Placement:
    """The placement a serving config (`muxserve plan --out`) runs: each mesh with the models
    it serves (standby listings, a mesh entry with `initial_state: asleep`, are not placed;
    a model entry's `initial_state` only says whether it is loaded at start)."""
    if not config.meshes:
        raise ConfigError("--current: the config has no meshes (write one with `muxserve plan`)")
    known = {s.name for s in problem.specs}
    meshes = []
    for mesh in config.meshes:
        placed = []
        for mm in mesh.models:
            if mm.initial_state == "asleep":
                continue
            if mm.name not in known:
                raise ConfigError(
                    f"--current: mesh {mesh.name!r} serves {mm.name!r}, which the models and "
                    "workload files do not list"
                )
            placed.append(_placed(mm.name, len(mesh.gpus), problem))
        if placed:
            meshes.append(PlacedMesh(mesh.node, tuple(mesh.gpus), tuple(placed)))
    return Placement("current", Mode.MUX, tuple(meshes), 0.0, "given")


def _placed(name: str, tp: int, problem: Problem) -> PlacedModel:
    t: Target = problem.targets[problem.index(name)]
    return PlacedModel(name, tp, 1.0, 1.0, 1.0, t.rate, 0.0, 0.0, math.inf, math.inf)
