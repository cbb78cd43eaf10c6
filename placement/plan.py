"""The `Placement` every algorithm returns, and its translation to a serving config.

A placement lists meshes (GPUs of one node), each with its KV pool size, and on each the
models it hosts with their tensor-parallel degree, SM shares, KV share and the rate the cost
model expects them to serve. `to_config` turns it into a `MuxConfig` that
`muxserve serve --config` reads as it is: every model's dtype and every mesh's pool are written
out, so the engines serve exactly what was budgeted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from muxserve.config import Mesh, MeshModel, ModelEntry, MuxConfig, SMShare
from placement.candidates import Candidate, CandidateTable, Mode
from placement.problem import Problem
from placement.specs import PlannerModel


@dataclass(frozen=True)
class PlacedModel:
    """A model's place on a mesh, with the cost model's estimates."""

    name: str
    tensor_parallel: int
    prefill_share: float  # SM share of its prefill jobs
    decode_share: float  # SM share of its decode jobs
    kv_share: float  # share of the mesh's KV pool
    rate: float  # requested requests/s
    served: float  # estimated requests/s served
    batch: float  # estimated mean decode batch
    tpot: float  # estimated decode step latency (s)
    ttft: float  # estimated prefill latency of one prompt (s), queueing aside
    time_share: float | None = None  # temporal: fraction of the mesh's time for its decodes
    replica: int = 0  # which of the model's replicas this is (0 for a model on one mesh)

    @property
    def serving_rate(self) -> float:
        """The rate its engine weights its KV quota by: what the plan expects it to serve
        (as `to_config` writes it), or its requested rate where the plan expects nothing."""
        return round(self.served, 4) or self.rate


@dataclass(frozen=True)
class PlacedMesh:
    """GPUs `gpus` (ids within node `node`) running one engine for `models`."""

    node: int
    gpus: tuple[int, ...]
    models: tuple[PlacedModel, ...]
    kv_pool_bytes: int | None = None  # KV pool per GPU, whole blocks; None: not sized

    @property
    def size(self) -> int:
        return len(self.gpus)


@dataclass(frozen=True)
class Placement:
    """Which models share which GPUs, as one algorithm decided."""

    algorithm: str
    mode: Mode
    meshes: tuple[PlacedMesh, ...]
    solve_time_s: float
    status: str  # "optimal", "time limit", "heuristic"
    gap: float | None = None  # relative optimality gap (ILP), when known
    kv_pool_bytes: int | None = None  # per GPU, the least over meshes (each has its own)
    bound: float | None = None  # proven upper bound on served_total (ILP), when known
    notes: tuple[str, ...] = ()  # what the algorithm wants said (fallbacks, time limits)

    @property
    def models(self) -> list[PlacedModel]:
        """Every placed model, a replicated one once per replica."""
        return [m for mesh in self.meshes for m in mesh.models]

    @property
    def served_total(self) -> float:
        return sum(m.served for m in self.models)

    @property
    def requested_total(self) -> float:
        return sum(self.rates().values())

    @property
    def gpus_used(self) -> int:
        return sum(mesh.size for mesh in self.meshes)

    def rates(self) -> dict[str, float]:
        """Requested rate per model."""
        return {m.name: m.rate for m in self.models}

    def served(self) -> dict[str, float]:
        """Served rate per model, over its replicas."""
        out: dict[str, float] = {}
        for m in self.models:
            out[m.name] = out.get(m.name, 0.0) + m.served
        return out

    def replicas(self, name: str) -> list[PlacedModel]:
        """The model's places, replica 0 first."""
        return sorted((m for m in self.models if m.name == name), key=lambda m: m.replica)

    def under_served(self, tolerance: float = 1e-6) -> list[PlacedModel]:
        """Models the plan serves below their requested rate (a replicated one as its first
        replica with `served` the total over its replicas)."""
        served = self.served()
        out = []
        for name, rate in self.rates().items():
            if served[name] < rate * (1 - tolerance):
                out.append(replace(self.replicas(name)[0], served=served[name]))
        return out

    def fairness(self) -> float:
        """The least served / requested ratio over models."""
        served = self.served()
        return min((served[n] / r for n, r in self.rates().items()), default=1.0)


def assemble(
    problem: Problem,
    table: CandidateTable,
    algorithm: str,
    meshes: Sequence[tuple[int, tuple[int, ...], Sequence[Candidate]]],
    *,
    solve_time_s: float,
    status: str,
    gap: float | None = None,
    bound: float | None = None,
    notes: tuple[str, ...] = (),
) -> Placement:
    """Build a placement from (node, gpus, candidates) per mesh; empty meshes are dropped."""
    placed, pools = [], []
    for node, gpus, cands in sorted(meshes, key=lambda m: (m[0], m[1])):
        if not cands:
            continue
        assert table.fits(cands), f"{algorithm}: mesh {node}:{gpus} is over capacity"
        pool = mesh_pool_bytes(problem, [(problem.specs[c.model], c.size) for c in cands])
        pools.append(pool)
        kv_total = sum(c.kv_bytes for c in cands)
        decode_sum = sum(c.share for c in cands)
        models = []
        for c in sorted(cands, key=lambda c: c.model):
            if table.mode is Mode.MUX:
                prefill = _prefill_share(problem, decode_sum)
                ttft = problem.cost.prefill_latency(
                    problem.specs[c.model], c.size, prefill, 1, problem.targets[c.model].prompt_len
                )
                decode, time_share = c.share, None
            else:
                prefill, decode, time_share, ttft = 1.0, 1.0, c.share, c.ttft
            models.append(
                PlacedModel(
                    name=problem.specs[c.model].name,
                    tensor_parallel=c.size,
                    prefill_share=round(prefill, 4),
                    decode_share=round(decode, 4),
                    kv_share=_share(c.kv_bytes, kv_total, len(cands)),
                    rate=problem.targets[c.model].rate,
                    served=c.served,
                    batch=c.batch,
                    tpot=c.tpot,
                    ttft=ttft,
                    time_share=time_share,
                    replica=c.replica,
                )
            )
        placed.append(PlacedMesh(node, tuple(gpus), tuple(models), pool or None))
    least = min(pools) if pools else None
    return Placement(
        algorithm, table.mode, tuple(placed), solve_time_s, status, gap, least or None, bound, notes
    )


def mesh_pool_bytes(problem: Problem, models: Iterable[tuple[PlannerModel, int]]) -> int:
    """The KV pool per GPU of a mesh hosting `models` (spec, TP degree), in whole blocks.

    The serving config's `kv_pool_bytes` where it sets one (every engine then uses it);
    otherwise what the usable memory leaves after each model's weights, activations and
    reserve, as the engine measures it on the device after loading the weights.
    """
    block = problem.engine.block_bytes
    if problem.engine.kv_pool_bytes is not None:
        return problem.engine.kv_pool_bytes // block * block
    fixed = sum(problem.cost.fixed_bytes(spec, tp, problem.engine) for spec, tp in models)
    return max(int((problem.usable_memory - fixed) // block * block), 0)


def _prefill_share(problem: Problem, decode_sum: float) -> float:
    """What the decodes leave of the SM admission limit, rounded down to 1%: one prefill then
    runs beside all decodes, without landing a float's width over the scheduler's limit."""
    left = math.floor((problem.sm_limit - decode_sum) * 100 - 1e-6) / 100
    return min(1.0, max(problem.params.min_prefill_share - 0.01, left))


def _share(part: float, total: float, n: int) -> float:
    """A KV share rounded down to 1e-4 (so shares never sum past 1), at least 1e-4."""
    raw = part / total if total > 0 else 1.0 / n
    return max(math.floor(raw * 1e4) / 1e4, 1e-4)


def to_config(placement: Placement, problem: Problem) -> MuxConfig:
    """The plan as a serving config: the models (paths carried along) and `meshes:`.

    A model with replicas is listed by every mesh that hosts one, each with the rate the plan
    expects that mesh to serve (the router spreads the model's requests over them); its
    `models:` entry carries replica 0's degree and shares, as the default for the rest.
    """
    placed = {m.name: m for m in reversed(placement.models) if m.replica == 0}
    entries = problem.entries or tuple(
        ModelEntry.model_validate({"name": s.name, "path": s.path}) for s in problem.specs
    )
    models = []
    for e, s, t in zip(entries, problem.specs, problem.targets, strict=True):
        pm = placed[e.name]
        models.append(
            e.model_copy(
                update={
                    "dtype": s.dtype,  # as budgeted, whatever the device would default to
                    "rate": t.rate,
                    "tensor_parallel": pm.tensor_parallel,
                    "sm_share": SMShare(prefill=pm.prefill_share, decode=pm.decode_share),
                }
            )
        )
    sized = problem.engine_is_default  # no `engine:` given: the plan sizes every mesh's pool
    meshes = [
        Mesh(
            name=f"mesh-{k}",
            node=mesh.node,
            gpus=list(mesh.gpus),
            kv_pool_bytes=mesh.kv_pool_bytes if sized else None,
            models=[
                MeshModel(
                    name=m.name,
                    tensor_parallel=m.tensor_parallel,
                    sm_share=SMShare(prefill=m.prefill_share, decode=m.decode_share),
                    kv_share=m.kv_share,
                    rate=round(m.served, 4),  # 0: the engine keeps the requested rate
                )
                for m in mesh.models
            ],
        )
        for k, mesh in enumerate(placement.meshes)
    ]
    engine = problem.engine
    if sized and placement.kv_pool_bytes:  # for a single engine serving the whole plan
        engine = engine.model_copy(update={"kv_pool_bytes": placement.kv_pool_bytes})
    if engine.executor == "inline" and any(m.tensor_parallel > 1 for m in placement.models):
        engine = engine.model_copy(update={"executor": "mps"})  # TP ranks are processes
    return MuxConfig(models=models, engine=engine, meshes=meshes)
