"""Routed experts (Mixtral, Qwen3-MoE): a router picks each token's top-k experts, whose
gated MLPs run as grouped matrix multiplies over all tokens at once.

The (token, choice) pairs are sorted by expert, so each expert's rows are contiguous; one
grouped GEMM per projection then multiplies every expert's rows by that expert's weights
(`torch.nn.functional.grouped_mm`, no host sync). Where grouped_mm is missing or refuses the
device/dtype, a loop over the experts that received tokens does the same, one GEMM each —
never a loop over tokens. Results are weighted and summed back per token in expert order, as
transformers does.

Under tensor parallelism every rank holds every expert, each with its slice of the inner width
(gate/up split by rows, down by columns); the combined output is all-reduced once per layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from muxserve.models.hf_config import HFModelConfig
from muxserve.parallel.layers import shard_size

log = logging.getLogger(__name__)

# (device type, dtype) pairs where grouped_mm failed once: the loop serves them from then on
_NO_GROUPED_MM: set[tuple[str, torch.dtype]] = set()


def grouped_linear(x: Tensor, weight: Tensor, counts: Tensor) -> Tensor:
    """Rows of `x` (N, in) grouped by expert (`counts` (E,) rows each, in order) times their
    expert's `weight` (E, out, in) transposed: (N, out)."""
    key = (x.device.type, x.dtype)
    grouped_mm: Callable[..., Tensor] | None = getattr(F, "grouped_mm", None)
    if grouped_mm is not None and key not in _NO_GROUPED_MM:
        offsets = torch.cumsum(counts, 0).to(torch.int32)  # (E,) end row of each expert
        try:
            out: Tensor = grouped_mm(x, weight.transpose(1, 2), offs=offsets)
            return out
        except (RuntimeError, NotImplementedError) as e:
            log.info("grouped_mm unavailable for %s, looping over experts: %s", key, e)
            _NO_GROUPED_MM.add(key)
    rows = x.split(counts.tolist())  # one host sync
    return torch.cat(
        [F.linear(r, weight[e]) for e, r in enumerate(rows) if r.shape[0]]
        or [x.new_zeros(0, weight.shape[1])]
    )


class Experts(nn.Module):
    """All experts of one layer, stacked: `gate_proj`, `up_proj` (E, I, H); `down_proj`
    (E, H, I)."""

    def __init__(self, config: HFModelConfig, tp_size: int = 1) -> None:
        super().__init__()
        e, h = config.num_experts, config.hidden_size
        i = shard_size(config.moe_intermediate_size, tp_size, "expert intermediate size")
        self.num_experts = e
        self.gate_proj = nn.Parameter(torch.empty(e, i, h))
        self.up_proj = nn.Parameter(torch.empty(e, i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self.act = F.silu

    def forward(self, x: Tensor, top_idx: Tensor, top_weights: Tensor) -> Tensor:
        """x (T, H); top_idx, top_weights (T, k) -> (T, H): sum_j w_j * expert_{idx_j}(x)."""
        k = top_idx.shape[1]
        flat = top_idx.reshape(-1)  # (T*k,) expert of each (token, choice)
        order = torch.argsort(flat, stable=True)  # grouped by expert, tokens in order within
        token = order // k  # (T*k,) the token of each sorted row
        counts = torch.bincount(flat, minlength=self.num_experts)  # (E,)
        rows = x[token]  # (T*k, H)
        hidden = self.act(grouped_linear(rows, self.gate_proj, counts)) * grouped_linear(
            rows, self.up_proj, counts
        )  # (T*k, I)
        out = grouped_linear(hidden, self.down_proj, counts)  # (T*k, H)
        out = out * top_weights.reshape(-1)[order, None]  # the weights' dtype, as in HF
        total = torch.zeros_like(x)
        return total.index_add_(0, token, out.to(x.dtype))  # (T, H)


class SparseMoeBlock(nn.Module):
    """The router (`gate`, replicated) and the experts; replaces the MLP of an MoE layer."""

    def __init__(self, config: HFModelConfig, tp_size: int = 1) -> None:
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(config, tp_size)
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.in_model_dtype = config.routing_in_model_dtype
        self.tp_size = tp_size

    def forward(self, x: Tensor) -> Tensor:
        logits = self.gate(x)  # (T, E)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)  # (T, k) each
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.in_model_dtype:
            weights = weights.to(x.dtype)
        out = self.experts(x, idx, weights)  # (T, H), this rank's partial sum under TP
        if self.tp_size > 1:
            dist.all_reduce(out)
        return out
