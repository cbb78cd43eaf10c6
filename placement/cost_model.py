"""Latency of one job (a prefill or a decode step of one model) on a mesh at an SM share.

Analytic by default — a roofline: a prefill is bound by FLOPs, a decode step by the bytes it
reads (weights + KV) — scaled by tensor parallelism and the SM share; a profile table measured
on a real GPU replaces the analytic latency where it has an entry (`ProfiledCostModel`).
"""

from __future__ import annotations

from typing import Protocol

from muxserve.config import EngineConfig
from placement.gpus import GPUSpec
from placement.params import AnalyticParams
from placement.profile_table import ProfileTable
from placement.specs import PlannerModel


class CostModel(Protocol):
    """What the planner and the simulator ask of a cost model."""

    gpu: GPUSpec
    params: AnalyticParams

    def prefill_latency(
        self, model: PlannerModel, tp: int, sm: float, num_seqs: int, prompt_len: float
    ) -> float: ...

    def decode_latency(
        self, model: PlannerModel, tp: int, sm: float, batch: float, context: float
    ) -> float: ...

    def bandwidth_share(self, sm: float) -> float: ...

    def decode_bytes(self, model: PlannerModel, tp: int, batch: float, context: float) -> float: ...

    def prefill_bytes(
        self, model: PlannerModel, tp: int, num_seqs: int, prompt_len: float
    ) -> float: ...

    def fixed_bytes(self, model: PlannerModel, tp: int, engine: EngineConfig) -> float: ...


class AnalyticCostModel:
    """Roofline latencies from the GPU's peak FLOP/s and HBM bandwidth."""

    def __init__(self, gpu: GPUSpec, params: AnalyticParams | None = None) -> None:
        self.gpu = gpu
        self.params = params or AnalyticParams()

    # ---- shares -------------------------------------------------------------------------
    def bandwidth_share(self, sm: float) -> float:
        """Fraction of HBM bandwidth one job gets with `sm` of the SMs.

        A memory-bound kernel saturates HBM before it has every SM, which is why a decode can
        give most SMs to a co-located prefill and lose little speed; below the saturation
        share, bandwidth falls as (share / saturation) ** exponent.
        """
        p = self.params
        return min(1.0, sm / p.sm_bandwidth_saturation) ** p.sm_bandwidth_exponent

    def compute_share(self, sm: float) -> float:
        """Fraction of the GPU's FLOP/s one job gets with `sm` of the SMs (under MPS better
        than in proportion: share ** exponent, exponent ≤ 1)."""
        return min(1.0, sm) ** self.params.sm_compute_exponent

    # ---- bytes ----------------------------------------------------------------------------
    def decode_bytes(self, model: PlannerModel, tp: int, batch: float, context: float) -> float:
        """HBM bytes one GPU reads in a decode step: its weight shard (of routed experts, those
        the batch's tokens pick) and the batch's KV."""
        return (model.weight_bytes_read(batch) + self._kv_read(model, batch, context)) / tp

    @staticmethod
    def _kv_read(model: PlannerModel, batch: float, context: float) -> float:
        return batch * context * model.kv_bytes_per_token

    def prefill_bytes(
        self, model: PlannerModel, tp: int, num_seqs: int, prompt_len: float
    ) -> float:
        """HBM bytes one GPU moves in a prefill: its weight shard and the KV it writes."""
        tokens = num_seqs * prompt_len
        return (model.weight_bytes_read(tokens) + tokens * model.kv_bytes_per_token) / tp

    def activation_bytes(self, model: PlannerModel, tp: int, engine: EngineConfig) -> float:
        """Peak activations per GPU: one layer of a full prefill chunk, plus fp32 logits."""
        c = model.config
        tokens = engine.prefill_token_budget
        per_token = 2 * c.hidden_size + (c.q_size + 2 * c.kv_size + 2 * c.intermediate_size) / tp
        logits = engine.max_batch_size * c.vocab_size * 4
        return tokens * per_token * model.dtype_bytes + logits

    def fixed_bytes(self, model: PlannerModel, tp: int, engine: EngineConfig) -> float:
        """Memory per GPU a model takes before any KV: weights, activations, reserve."""
        return (
            model.weight_bytes / tp
            + self.activation_bytes(model, tp, engine)
            + self.params.reserve_bytes_per_model
        )

    # ---- latencies ------------------------------------------------------------------------
    def prefill_latency(
        self, model: PlannerModel, tp: int, sm: float, num_seqs: int, prompt_len: float
    ) -> float:
        """Seconds to prefill `num_seqs` prompts of `prompt_len` tokens in one job."""
        tokens = num_seqs * prompt_len
        flops = tokens * model.flops_per_token(prompt_len / 2)
        nbytes = self.prefill_bytes(model, tp, num_seqs, prompt_len)
        overhead = self.params.prefill_overhead_s
        return self._roofline(model, tp, sm, flops, nbytes, tokens, num_seqs, overhead)

    def decode_latency(
        self, model: PlannerModel, tp: int, sm: float, batch: float, context: float
    ) -> float:
        """Seconds for one decode step of `batch` sequences with `context` tokens each."""
        p = self.params
        flops = batch * model.flops_per_token(context)
        nbytes = self.decode_bytes(model, tp, batch, context)
        after = 0.0
        if p.kv_read == "separate":  # the attention kernels read the KV on their own
            kv = self._kv_read(model, batch, context) / tp
            nbytes -= kv
            after = kv / (self.gpu.hbm_bytes_per_s * p.kv_bandwidth_efficiency
                          * self.bandwidth_share(sm))  # fmt: skip
        return after + self._roofline(model, tp, sm, flops, nbytes, batch, batch, p.step_overhead_s)

    def _roofline(
        self,
        model: PlannerModel,
        tp: int,
        sm: float,
        flops: float,
        nbytes: float,
        tokens: float,
        seqs: float,
        overhead: float,
    ) -> float:
        p, g = self.params, self.gpu
        t_compute = flops / (tp * g.peak_flops * p.compute_efficiency * self.compute_share(sm))
        t_memory = nbytes / (g.hbm_bytes_per_s * p.bandwidth_efficiency * self.bandwidth_share(sm))
        return (
            max(t_compute, t_memory)
            + self.allreduce_time(model, tp, tokens)
            + overhead
            + p.per_seq_overhead_s * seqs
        )

    def allreduce_time(self, model: PlannerModel, tp: int, tokens: float) -> float:
        """Two ring all-reduces of the hidden state per layer under tensor parallelism."""
        if tp == 1:
            return 0.0
        nbytes = tokens * model.config.hidden_size * model.dtype_bytes
        ring = 2 * (tp - 1) / tp * nbytes / self.gpu.link_bytes_per_s
        return 2 * model.config.num_layers * (self.params.allreduce_latency_s + ring)


class ProfiledCostModel(AnalyticCostModel):
    """Measured latencies where the table has them, analytic ones elsewhere."""

    def __init__(
        self, gpu: GPUSpec, table: ProfileTable, params: AnalyticParams | None = None
    ) -> None:
        super().__init__(gpu, params)
        self.table = table

    def prefill_latency(
        self, model: PlannerModel, tp: int, sm: float, num_seqs: int, prompt_len: float
    ) -> float:
        def analytic(s: float) -> float:
            return AnalyticCostModel.prefill_latency(self, model, tp, s, num_seqs, prompt_len)

        t = self.table.prefill(model.arch_key, tp, sm, num_seqs * prompt_len, analytic)
        return analytic(sm) if t is None else t

    def decode_latency(
        self, model: PlannerModel, tp: int, sm: float, batch: float, context: float
    ) -> float:
        def analytic(s: float) -> float:
            return AnalyticCostModel.decode_latency(self, model, tp, s, batch, context)

        t = self.table.decode(model.arch_key, tp, sm, batch, context, analytic)
        return analytic(sm) if t is None else t
