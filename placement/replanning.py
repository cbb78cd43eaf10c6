"""The placement planner as the router's re-planner (`muxserve.router.replan.Planner`).

`PlacementPlanner.propose` turns the router's observed workload into a planning problem (a
cluster file stands for the meshes' GPUs), and judges two searches by one rule
(`placement.migration.decide`): the planner's whole plan (`placement.algorithms.solve`, the
greedy, with a short time limit) fitted onto the plan's fixed meshes (`fit_to_meshes`), and a
local search from the current placement (one model moved at a time while that pays more).
It lives here, above the router: the router only knows the `Planner` protocol, and
`muxserve serve` hands it this one.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence

from muxserve.config import Mesh, MuxConfig, ReplanConfig
from muxserve.errors import ConfigError
from muxserve.models.hf_config import load_hf_config
from muxserve.router.observed import ObservedLoad
from muxserve.router.replan import Assignment, Proposal
from placement.algorithms import SolveOptions, solve
from placement.candidates import Mode
from placement.deadline import PlanningTimeout
from placement.gpus import load_cluster
from placement.migration import Decision, candidate_table, decide, evaluate, move_costs
from placement.plan import PlacedMesh, PlacedModel, Placement
from placement.problem import Problem, make_problem
from placement.specs import PlannerModel, spec_from_config
from placement.workload import SLO, Demand, Workload

log = logging.getLogger(__name__)

DEFAULT_PROMPT_LEN = 64  # planned for a model with no request in the window
DEFAULT_OUTPUT_LEN = 64
MIN_RATE = 1e-3  # req/s planned for an idle model (the planner wants every rate positive)
MAX_LOCAL_MOVES = 3  # models the local search moves in one round, at most
LOCAL_CANDIDATES = 6  # it tries moving the busiest this many models


class PlacementPlanner:
    """The placement planner on the observed workload, fitted onto the plan's meshes."""

    def __init__(self, config: MuxConfig, settings: ReplanConfig) -> None:
        if not config.meshes:
            raise ConfigError("re-planning needs a plan with meshes")
        self.settings = settings
        self.config = config
        self.meshes: list[Mesh] = list(config.meshes)
        self.cluster = load_cluster(settings.cluster)
        on_gpu = config.engine.device != "cpu"
        self.specs = tuple(
            spec_from_config(
                m.name, m.path, load_hf_config(m.path), m.dtype, m.max_model_len, on_gpu=on_gpu
            )
            for m in config.models
        )
        self.horizon_s = settings.horizon_s or settings.interval_s
        self.placeable = placeable(config, self.specs, settings.add_models)

    def problem(self, loads: Mapping[str, ObservedLoad]) -> Problem:
        demands = []
        for s in self.specs:
            load = loads.get(s.name)
            rate = max(load.rate if load else 0.0, MIN_RATE)
            plen = round(load.prompt_len) if load and load.prompt_len else DEFAULT_PROMPT_LEN
            olen = round(load.output_len) if load and load.output_len else DEFAULT_OUTPUT_LEN
            demands.append(Demand(s.name, rate, max(plen, 1), max(olen, 1), SLO(scale=8.0)))
        return make_problem(
            self.specs, Workload(tuple(demands)), self.cluster, engine=self.config.engine
        )

    def placement_of(self, active: Assignment, problem: Problem) -> Placement:
        """The meshes and their active models as a placement (served estimates left to
        `evaluate`)."""
        placed = []
        for mesh in self.meshes:
            here = [m for m, where in active.items() if mesh.name in where]
            models = tuple(_stub(m, len(mesh.gpus), problem) for m in sorted(here))
            if models:
                placed.append(PlacedMesh(mesh.node, tuple(mesh.gpus), models))
        return Placement("current", Mode.MUX, tuple(placed), 0.0, "given")

    def propose(self, loads: Mapping[str, ObservedLoad], active: Assignment) -> Proposal | None:
        """The best of two searches, judged by one rule (`placement.migration.decide`): the
        planner's whole plan fitted onto the meshes, and a local search from the current
        placement (one model moved at a time, while that pays more)."""
        problem = self.problem(loads)
        options = SolveOptions(time_limit=self.settings.time_limit_s)
        answers: list[tuple[dict[str, tuple[str, ...]], tuple[str, ...]]] = []
        try:
            new = solve(problem, ("greedy",), options, progress=None)["greedy"]
            answers = fit_to_meshes(new, self.meshes, active, self.placeable)
        except (ConfigError, PlanningTimeout) as e:
            log.warning("re-planning: the planner found no plan (%s); local moves only", e)
        current = evaluate(self.placement_of(active, problem), problem)
        costs = move_costs(problem, self.settings.move_cost_s)
        now = {m: tuple(where) for m, where in active.items()}

        table = candidate_table(problem)  # one cost-model table for every answer judged

        def judge(target: Mapping[str, Sequence[str]]) -> Decision:
            proposed = evaluate(self.placement_of(target, problem), problem, table)
            return decide(current, proposed, costs, self.horizon_s)

        # the answer that pays most; where none pays, the one with the most gain (its
        # decision says why even that is not worth its moves)
        best: tuple[tuple[bool, float], dict[str, tuple[str, ...]], tuple[str, ...], Decision]
        best = ((False, -math.inf), now, (), decide(current, current, costs, 1.0))
        for target, notes in [*answers, *self._local(now, problem, judge)]:
            d = judge(target)
            key = (d.take, d.net if d.take else d.gain)
            if key > best[0]:
                best = (key, target, notes, d)
        _, target, notes, decision = best
        rates = {
            s.name: round(t.rate, 4) for s, t in zip(problem.specs, problem.targets, strict=True)
        }
        return Proposal(target, decision, rates, notes)

    def _local(
        self,
        start: dict[str, tuple[str, ...]],
        problem: Problem,
        judge: Callable[[Mapping[str, Sequence[str]]], Decision],
    ) -> list[tuple[dict[str, tuple[str, ...]], tuple[str, ...]]]:
        """Hill climbing from `start`: each step moves one model (the busiest first) to
        another mesh that may hold it (`placeable`), the move whose plan pays most; stops
        when none pays more or after `MAX_LOCAL_MOVES`. Returns the last placement reached
        (if any move paid)."""
        listed = {
            m.name: [mesh.name for mesh in self.meshes if m.name in self.placeable[mesh.name]]
            for m in self.config.models
        }
        rates = {s.name: t.rate for s, t in zip(problem.specs, problem.targets, strict=True)}
        cur, cur_net = start, 0.0
        for _ in range(MAX_LOCAL_MOVES):
            step: tuple[float, dict[str, tuple[str, ...]]] | None = None
            for model in sorted(cur, key=lambda m: -rates.get(m, 0.0))[:LOCAL_CANDIDATES]:
                for mesh in listed.get(model, []):
                    if mesh in cur[model] or len(cur[model]) != 1:
                        continue
                    target = {**cur, model: (mesh,)}
                    d = judge(target)
                    if d.take and d.net > cur_net + 1e-9 and (step is None or d.net > step[0]):
                        step = (d.net, target)
            if step is None:
                break
            cur_net, cur = step
        return [] if cur is start else [(cur, ("local search from the current placement",))]


def _stub(name: str, tp: int, problem: Problem) -> PlacedModel:
    rate = problem.targets[problem.index(name)].rate
    return PlacedModel(name, tp, 1.0, 1.0, 1.0, rate, 0.0, 0.0, 0.0, 0.0)


def placeable(
    config: MuxConfig, specs: Sequence[PlannerModel], add_models: bool
) -> dict[str, set[str]]:
    """Mesh -> the models it may serve: those it lists; with `add_models`, also every model
    whose heads split over its GPUs and whose weights (per GPU) fit its weights budget, if
    it has one (the router adds such a model to the mesh when it moves there)."""
    out = {}
    for mesh in config.meshes or []:
        here = {mm.name for mm in mesh.models}
        if add_models:
            tp = len(mesh.gpus)
            budget = mesh.weights_budget_bytes or config.engine.residency.weights_budget_bytes
            here |= {
                s.name
                for s in specs
                if s.supports_tp(tp) and (budget is None or s.weight_bytes // tp <= budget)
            }
        out[mesh.name] = here
    return out


def fit_to_meshes(
    plan: Placement,
    meshes: Sequence[Mesh],
    active: Assignment,
    placeable: Mapping[str, set[str]] | None = None,
    limit: int = 64,
) -> list[tuple[dict[str, tuple[str, ...]], tuple[str, ...]]]:
    """Where each model would be active if `plan` ran on the fixed `meshes`: one answer (with
    notes) per way of matching the plan's meshes to fixed meshes of the same size (nodes
    are alike), distinct answers only, at most `limit` (the matchings that put the most
    models on meshes that list them, and where they are active already, first).

    A model whose planned mesh may not serve it (`placeable`: mesh -> models; default: the
    models each mesh lists) stays where it is, with a note; the caller picks among the
    answers by the cost model (`PlacementPlanner.propose`).
    """
    listed = {m.name: {mm.name for mm in m.models} for m in meshes}
    if placeable is not None:
        listed = {m: set(placeable.get(m, ())) for m in listed}

    def score(k: int, mesh: Mesh) -> int:
        return sum(
            (10 if pm.name in listed[mesh.name] else 0)
            + (1 if mesh.name in active.get(pm.name, ()) else 0)
            for pm in plan.meshes[k].models
        )

    per_size: list[list[dict[int, Mesh]]] = []
    for size in sorted({m.size for m in plan.meshes}):
        ks = [k for k, m in enumerate(plan.meshes) if m.size == size]
        fixed = [m for m in meshes if len(m.gpus) == size]
        options: list[dict[int, Mesh]]
        if len(ks) <= 6 and len(fixed) <= 6:
            if len(ks) <= len(fixed):  # every way to give each planned mesh its own fixed one
                options = [
                    dict(zip(ks, perm, strict=True))
                    for perm in itertools.permutations(fixed, len(ks))
                ]
            else:  # every way to pick which planned meshes the fixed ones take
                options = [
                    dict(zip(perm, fixed, strict=True))
                    for perm in itertools.permutations(ks, len(fixed))
                ]
        else:  # greedy by score: one matching
            pairs = sorted(
                ((score(k, f), k, i) for k in ks for i, f in enumerate(fixed)), reverse=True
            )
            one: dict[int, Mesh] = {}
            used: set[int] = set()
            for _, k, i in pairs:
                if k not in one and i not in used:
                    one[k] = fixed[i]
                    used.add(i)
            options = [one]
        options.sort(key=lambda o: -sum(score(k, f) for k, f in o.items()))
        per_size.append(options[:limit])
    answers: dict[tuple, tuple[dict[str, tuple[str, ...]], tuple[str, ...]]] = {}
    for combo in itertools.islice(itertools.product(*per_size), limit):
        match = {k: f for part in combo for k, f in part.items()}
        target, notes = _fit(plan, match, listed, active)
        answers.setdefault(tuple(sorted(target.items())), (target, notes))
    return list(answers.values())


def _fit(
    plan: Placement,
    match: Mapping[int, Mesh],
    listed: Mapping[str, set[str]],
    active: Assignment,
) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
    wanted: dict[str, list[str]] = {}
    notes = []
    for k, pmesh in enumerate(plan.meshes):
        mesh = match.get(k)
        for pm in pmesh.models:
            if mesh is None:
                notes.append(f"{pm.name}: the plan's mesh of {pmesh.size} GPUs has no match")
            elif pm.name not in listed[mesh.name]:
                notes.append(
                    f"{pm.name}: planned on {mesh.name}, which does not list it (list it "
                    "there as a standby model, or set router.replan.add_models, to let it move)"
                )
            else:
                wanted.setdefault(pm.name, []).append(mesh.name)
    target = {}
    for model, now in active.items():
        target[model] = tuple(sorted(wanted[model])) if wanted.get(model) else tuple(now)
    return target, tuple(notes)
