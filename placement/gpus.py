"""GPU and cluster specs: built-in GPU types, each field overridable in the cluster file.

Numbers are the vendors' dense fp16/bf16 tensor-core peaks and HBM bandwidths (SXM parts
where there are two), so the analytic cost model needs no profiling to give a first plan.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from muxserve.errors import ConfigError
from placement.files import Strict, read_yaml, validate
from placement.params import AnalyticParams, PlannerParams

GIB = 1 << 30
MAX_NODES = 512  # nodes one plan covers (larger clusters: plan groups of nodes)
MAX_GPUS_PER_NODE = 16
MAX_GPUS = 4096


class GPUSpec(Strict):
    """One GPU type."""

    name: str
    memory_gib: float = Field(gt=0)  # device memory
    peak_tflops: float = Field(gt=0)  # dense fp16/bf16 tensor-core peak
    hbm_gbps: float = Field(gt=0)  # HBM bandwidth, GB/s (1e9 bytes)
    sm_count: int = Field(gt=0)
    interconnect_gbps: float = Field(gt=0)  # per-GPU bandwidth for all-reduce in a node

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_gbps * 1e9

    @property
    def link_bytes_per_s(self) -> float:
        return self.interconnect_gbps * 1e9


BUILTIN_GPUS: dict[str, GPUSpec] = {
    g.name: g
    for g in (
        GPUSpec(
            name="A100-40GB",
            memory_gib=40,
            peak_tflops=312,
            hbm_gbps=1555,
            sm_count=108,
            interconnect_gbps=300,
        ),
        GPUSpec(
            name="A100-80GB",
            memory_gib=80,
            peak_tflops=312,
            hbm_gbps=2039,
            sm_count=108,
            interconnect_gbps=300,
        ),
        GPUSpec(
            name="H100-80GB",
            memory_gib=80,
            peak_tflops=989,
            hbm_gbps=3350,
            sm_count=132,
            interconnect_gbps=450,
        ),
        GPUSpec(
            name="H200",
            memory_gib=141,
            peak_tflops=989,
            hbm_gbps=4800,
            sm_count=132,
            interconnect_gbps=450,
        ),
        GPUSpec(
            name="L40S",
            memory_gib=48,
            peak_tflops=362,
            hbm_gbps=864,
            sm_count=142,
            interconnect_gbps=32,
        ),
    )
}


class GPUOverride(Strict):
    """A built-in GPU type with some fields replaced (`type:` names the base)."""

    type: str
    memory_gib: float | None = Field(None, gt=0)
    peak_tflops: float | None = Field(None, gt=0)
    hbm_gbps: float | None = Field(None, gt=0)
    sm_count: int | None = Field(None, gt=0)
    interconnect_gbps: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _known(self) -> GPUOverride:
        if self.type not in BUILTIN_GPUS:
            raise ValueError(f"unknown GPU type {self.type!r}; known: {', '.join(BUILTIN_GPUS)}")
        return self

    def resolve(self) -> GPUSpec:
        changes = {k: v for k, v in self.model_dump(exclude={"type"}).items() if v is not None}
        return BUILTIN_GPUS[self.type].model_copy(update=changes)


class ClusterFile(Strict):
    """The `--cluster` file."""

    gpu: GPUOverride  # a built-in type's name, or a mapping with `type:` and overrides
    nodes: int = Field(1, ge=1, le=MAX_NODES)
    gpus_per_node: int = Field(8, ge=1, le=MAX_GPUS_PER_NODE)
    cost_model: AnalyticParams = AnalyticParams()
    planner: PlannerParams = PlannerParams()
    profile: str | None = None  # a profile table (JSON); relative to this file

    @field_validator("gpu", mode="before")
    @classmethod
    def _by_name(cls, v: object) -> object:
        return {"type": v} if isinstance(v, str) else v


class ClusterSpec(Strict):
    """A homogeneous cluster: `nodes` × `gpus_per_node` GPUs of one type."""

    gpu: GPUSpec
    nodes: int = Field(ge=1)
    gpus_per_node: int = Field(ge=1)
    cost_model: AnalyticParams = AnalyticParams()
    planner: PlannerParams = PlannerParams()
    profile: str | None = None  # absolute path of a profile table, if any

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node


def make_cluster(gpu: str, nodes: int, gpus_per_node: int, **overrides: object) -> ClusterSpec:
    """A cluster of a built-in GPU type (for scripts and tests)."""
    if gpu not in BUILTIN_GPUS:
        raise ConfigError(f"unknown GPU type {gpu!r}; known: {', '.join(BUILTIN_GPUS)}")
    return ClusterSpec.model_validate(
        {"gpu": BUILTIN_GPUS[gpu], "nodes": nodes, "gpus_per_node": gpus_per_node, **overrides}
    )


def load_cluster(path: str | Path) -> ClusterSpec:
    """Read a cluster file; errors name the file and the dotted key."""
    p = Path(path)
    raw = validate(ClusterFile, read_yaml(p), str(p))
    gpu = raw.gpu.resolve()
    profile = None
    if raw.profile is not None:
        prof = Path(raw.profile).expanduser()
        prof = prof if prof.is_absolute() else (p.parent / prof).resolve()
        if not prof.exists():
            raise ConfigError(f"{p}: profile: no such file {prof}")
        profile = str(prof)
    return ClusterSpec(
        gpu=gpu,
        nodes=raw.nodes,
        gpus_per_node=raw.gpus_per_node,
        cost_model=raw.cost_model,
        planner=raw.planner,
        profile=profile,
    )
