"""One planning instance: models, their demands, the cluster, the cost model, the engine.

Built once and shared by every algorithm, so they all plan against the same numbers. Bad
input is caught here: a model no mesh of the cluster can hold is a `ConfigError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from muxserve.config import EngineConfig, ModelEntry
from muxserve.errors import ConfigError
from placement.cost_model import AnalyticCostModel, CostModel, ProfiledCostModel
from placement.deadline import Deadline
from placement.gpus import (
    GIB,
    MAX_GPUS,
    MAX_GPUS_PER_NODE,
    MAX_NODES,
    ClusterSpec,
    load_cluster,
)
from placement.params import PlannerParams
from placement.profile_table import load_profile
from placement.ray_cluster import cluster_from_ray, is_ray_cluster
from placement.specs import PlannerModel, load_models
from placement.workload import MAX_MODELS, Arrival, Workload, load_workload


@dataclass(frozen=True)
class Target:
    """A model's demand with its SLO resolved to seconds (None: unconstrained)."""

    rate: float  # requests/s
    prompt_len: int
    output_len: int
    ttft: float | None
    tpot: float | None

    @property
    def decode_steps(self) -> int:
        """Decode steps per request: the first output token comes from the prefill."""
        return max(self.output_len - 1, 1)

    @property
    def mean_context(self) -> float:
        """Mean tokens in the KV cache over a request's decode steps."""
        return self.prompt_len + self.output_len / 2


@dataclass(frozen=True)
class Problem:
    """Everything a placement algorithm needs."""

    specs: tuple[PlannerModel, ...]
    targets: tuple[Target, ...]  # aligned with specs
    cluster: ClusterSpec
    cost: CostModel
    engine: EngineConfig = field(default_factory=EngineConfig)
    arrival: Arrival = field(default_factory=Arrival)
    entries: tuple[ModelEntry, ...] = ()  # the models file's entries, carried into the plan
    engine_is_default: bool = True  # no `engine:` given: the plan sizes the KV pool
    min_sizes: tuple[int, ...] = field(default=(), compare=False)  # smallest mesh per model

    @property
    def params(self) -> PlannerParams:
        return self.cluster.planner

    @property
    def num_models(self) -> int:
        return len(self.specs)

    @property
    def mesh_sizes(self) -> tuple[int, ...]:
        """Mesh sizes that fit in a node."""
        return tuple(s for s in self.params.mesh_sizes if s <= self.cluster.gpus_per_node)

    @property
    def usable_memory(self) -> float:
        """Bytes per GPU the plan may use."""
        return self.cluster.gpu.memory_bytes * self.params.memory_utilization

    @property
    def sm_limit(self) -> float:
        """SM shares of jobs running at once on a GPU: 100% plus the overload allowance."""
        return 1.0 + self.engine.sm_overload

    @property
    def total_rate(self) -> float:
        return sum(t.rate for t in self.targets)

    def index(self, name: str) -> int:
        return next(i for i, s in enumerate(self.specs) if s.name == name)

    def kv_bytes_per_request(self, i: int) -> float:
        """KV bytes a request holds at its end, over all GPUs of its mesh.

        Prompt and output tokens rounded up to whole blocks, plus the one block per running
        request the scheduler keeps free so a decode never has to wait for its next block.
        """
        t, spec = self.targets[i], self.specs[i]
        per_block = self.engine.block_bytes // (2 * spec.config.head_dim * spec.dtype_bytes)
        tokens = -(-(t.prompt_len + t.output_len) // per_block) * per_block + per_block
        return tokens * spec.kv_bytes_per_token

    def fits(self, i: int, size: int) -> bool:
        """Whether model i can run on a mesh of `size` GPUs with room for one request's KV."""
        spec = self.specs[i]
        if not spec.supports_tp(size):
            return False
        free = self.usable_memory - self.cost.fixed_bytes(spec, size, self.engine)
        return free >= self.kv_bytes_per_request(i) / size


def make_problem(
    specs: list[PlannerModel] | tuple[PlannerModel, ...],
    workload: Workload,
    cluster: ClusterSpec,
    *,
    engine: EngineConfig | None = None,
    cost: CostModel | None = None,
    entries: tuple[ModelEntry, ...] = (),
    engine_is_default: bool = True,
    deadline: Deadline | None = None,
) -> Problem:
    """Resolve SLOs and check that every model fits on some mesh of the cluster.

    At most `MAX_MODELS` models and `MAX_GPUS` GPUs: past them a plan would take longer to
    make than to read, so they are refused with what to do instead.
    """
    check_size(len(specs), cluster)
    deadline = deadline or Deadline.never()
    engine = engine or EngineConfig()
    if cost is None:
        cost = AnalyticCostModel(cluster.gpu, cluster.cost_model)
        if cluster.profile is not None:
            cost = ProfiledCostModel(cluster.gpu, load_profile(cluster.profile), cluster.cost_model)
    raw = [(d.rate, d.prompt_len, d.output_len) for d in workload.demands]
    draft = Problem(
        tuple(specs),
        tuple(Target(r, p, o, None, None) for r, p, o in raw),
        cluster,
        cost,
        engine,
        workload.arrival,
        entries,
        engine_is_default,
    )
    min_sizes = []
    for i in range(len(specs)):
        deadline.check(f"checking which meshes hold each model ({i + 1} of {len(specs)})")
        sizes = [s for s in draft.mesh_sizes if draft.fits(i, s)]
        if not sizes:
            raise ConfigError(_no_mesh_message(draft, i))
        min_sizes.append(sizes[0])
    targets = []
    for i, (spec, d) in enumerate(zip(specs, workload.demands, strict=True)):
        ttft, tpot = d.slo.ttft, d.slo.tpot
        if d.slo.scale is not None:
            s = min_sizes[i]
            base_ttft = cost.prefill_latency(spec, s, 1.0, 1, d.prompt_len)
            base_tpot = cost.decode_latency(spec, s, 1.0, 1, d.prompt_len + d.output_len / 2)
            ttft, tpot = d.slo.scale * base_ttft, d.slo.scale * base_tpot
        targets.append(Target(d.rate, d.prompt_len, d.output_len, ttft, tpot))
    return Problem(
        tuple(specs),
        tuple(targets),
        cluster,
        cost,
        engine,
        workload.arrival,
        entries,
        engine_is_default,
        tuple(min_sizes),
    )


def check_size(num_models: int, cluster: ClusterSpec) -> None:
    """Refuse instances past the planner's bounds, saying which bound and what to do."""
    if num_models > MAX_MODELS:
        raise ConfigError(
            f"{num_models} models to plan; the planner plans at most {MAX_MODELS} at once: "
            "split them into groups and plan each on its own share of the nodes"
        )
    if cluster.nodes > MAX_NODES or cluster.gpus_per_node > MAX_GPUS_PER_NODE:
        raise ConfigError(
            f"{cluster.nodes} nodes x {cluster.gpus_per_node} GPUs; the planner plans at most "
            f"{MAX_NODES} nodes of at most {MAX_GPUS_PER_NODE} GPUs at once: plan groups of "
            "nodes separately"
        )
    if cluster.num_gpus > MAX_GPUS:
        raise ConfigError(
            f"{cluster.nodes} nodes x {cluster.gpus_per_node} GPUs = {cluster.num_gpus} GPUs; "
            f"the planner plans at most {MAX_GPUS} at once: plan groups of nodes separately"
        )


def _no_mesh_message(p: Problem, i: int) -> str:
    spec = p.specs[i]
    largest = max(p.mesh_sizes)
    why = []
    bad_tp = [s for s in p.mesh_sizes if not spec.supports_tp(s)]
    if bad_tp:
        why.append(
            f"its {spec.config.num_heads} attention heads / {spec.config.num_kv_heads} KV heads "
            f"do not split over {', '.join(map(str, bad_tp))} GPUs"
        )
    need = spec.weight_bytes / GIB
    have = largest * p.usable_memory / GIB
    why.append(
        f"it needs {need:.1f} GiB of weights ({spec.dtype}) plus activations and KV, and the "
        f"largest mesh ({largest} × {p.cluster.gpu.name}) offers {have:.1f} GiB"
    )
    return f"model {spec.name!r} fits on no mesh of this cluster: {'; '.join(why)}"


def load_problem(
    models: str | Path,
    cluster: str | Path,
    workload: str | Path,
    deadline: Deadline | None = None,
) -> Problem:
    """Read the three input files into a problem; errors name the file and key.

    The cluster and the workload are read first, so a workload past `MAX_MODELS` is refused
    before any model's config.json is read.
    """
    deadline = deadline or Deadline.never()
    if isinstance(cluster, str) and is_ray_cluster(cluster):
        cl = cluster_from_ray(cluster)
    else:
        cl = load_cluster(cluster)
    load_workload(workload)  # its own checks (and size), before reading every model
    deadline.check("reading the workload")
    model_set = load_models(models)
    deadline.check("reading the models' config.json files")
    wl = load_workload(workload, [s.name for s in model_set.specs])
    return make_problem(
        model_set.specs,
        wl,
        cl,
        engine=model_set.engine,
        entries=model_set.entries,
        engine_is_default=model_set.engine_is_default,
        deadline=deadline,
    )
