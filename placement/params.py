"""Tunable constants of the cost model and the planner, with their defaults.

Both can be overridden in the cluster file (`cost_model:` and `planner:`), since they describe
how a given machine behaves and how finely it is planned.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from placement.files import Strict

DEFAULT_SM_LEVELS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)


class AnalyticParams(Strict):
    """Efficiencies and overheads of the analytic (roofline) cost model.

    The defaults are fitted by `scripts/fit_cost_model.py` to MuxServe's measured A100-80GB
    table (LLaMA 7B-65B, fp16, tp 1-8, SM 30-100 %): predicted / measured has a median of 1.04
    (prefill) and 1.00 (decode), 92 % and 94 % of points within 0.8-1.25x; fitted without
    30B, 30B is predicted as well (1.09 and 1.05). GPUs without a table get this shape.
    """

    compute_efficiency: float = Field(0.57, gt=0, le=1)  # achieved / peak FLOP/s in GEMMs
    bandwidth_efficiency: float = Field(0.95, gt=0, le=1)  # achieved / peak HBM, weight reads
    # SM share at which one job reaches full HBM bandwidth: below it, bandwidth ∝
    # (share / saturation) ** sm_bandwidth_exponent
    sm_bandwidth_saturation: float = Field(0.57, gt=0, le=1)
    sm_bandwidth_exponent: float = Field(0.6, gt=0, le=1)
    # compute at an SM share s: s ** sm_compute_exponent of the whole GPU's (MPS does better
    # than linear: < 1)
    sm_compute_exponent: float = Field(0.83, gt=0, le=1.5)
    step_overhead_s: float = Field(4.9e-3, ge=0)  # per decode step: launch, scheduling
    prefill_overhead_s: float = Field(9.1e-3, ge=0)  # per prefill job
    per_seq_overhead_s: float = Field(8.6e-6, ge=0)  # per sequence in a batch: bookkeeping
    allreduce_latency_s: float = Field(9.3e-5, ge=0)  # fixed cost of one tensor-parallel all-reduce
    # a decode's KV read: inside the roofline (overlapped with the weights' read), or after it
    # at its own efficiency (attention kernels run on their own, as measured on A100)
    kv_read: Literal["roofline", "separate"] = "separate"
    kv_bandwidth_efficiency: float = Field(0.55, gt=0, le=1)
    reserve_bytes_per_model: int = Field(1 << 30, ge=0)  # CUDA context, workspaces, per GPU


class PlannerParams(Strict):
    """How finely shares are planned and how much headroom is kept."""

    sm_levels: tuple[float, ...] = DEFAULT_SM_LEVELS  # decode SM shares to choose from
    # fractions of what a model can serve at a share that it may be planned to serve
    service_levels: tuple[float, ...] = (1.0, 0.5, 0.25)
    min_prefill_share: float = Field(0.3, gt=0, le=1)  # SMs left for a prefill beside decodes
    # planned busy share of a GPU's SM time and HBM bandwidth: headroom keeps queues stable
    max_utilization: float = Field(0.85, gt=0, le=1)
    memory_utilization: float = Field(0.9, gt=0, le=1)  # of each GPU's memory
    mesh_sizes: tuple[int, ...] = (1, 2, 4, 8)  # GPUs per mesh (within one node)
    # meshes a model may be placed on, its rate split between them (1: no replicas); only a
    # model its smallest mesh cannot serve alone gets them, as many as its rate needs there
    max_replicas: int = Field(1, ge=1, le=16)

    @field_validator("sm_levels")
    @classmethod
    def _levels(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not 0 < x <= 1 for x in v):
            raise ValueError("sm_levels must be a non-empty list of shares in (0, 1]")
        return tuple(sorted(set(v)))

    @field_validator("service_levels")
    @classmethod
    def _service(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not 0 < x <= 1 for x in v) or max(v) != 1.0:
            raise ValueError("service_levels must be fractions in (0, 1] including 1")
        return tuple(sorted(set(v), reverse=True))

    @field_validator("mesh_sizes")
    @classmethod
    def _sizes(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(s < 1 for s in v):
            raise ValueError("mesh_sizes must be a non-empty list of positive integers")
        return tuple(sorted(set(v)))


# The analytic model as first written, before its defaults were fitted to MuxServe's A100
# measurements: the fit script compares against it, and the algorithm tests plan with it.
ROOFLINE = AnalyticParams(
    compute_efficiency=0.6,
    bandwidth_efficiency=0.8,
    sm_bandwidth_saturation=0.4,
    sm_bandwidth_exponent=1.0,
    sm_compute_exponent=1.0,
    step_overhead_s=1.5e-3,
    prefill_overhead_s=1.5e-3,
    per_seq_overhead_s=2e-5,
    allreduce_latency_s=1e-5,
    kv_read="roofline",
)
