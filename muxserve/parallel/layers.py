"""Tensor-parallel linear layers (Megatron style) over the default torch.distributed group.

A column-parallel layer holds a slice of the output features and needs no communication: its
output feeds per-head attention or the element-wise SwiGLU, which split the same way. A
row-parallel layer holds the matching slice of the input features; its partial products are
summed across ranks (all-reduce) before the bias, which every rank holds whole. Parameter
names are `weight` and `bias`, as in `nn.Linear`, so a sharded model has HF's names.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def shard_size(total: int, world_size: int, what: str) -> int:
    """`total / world_size`, or a clear error when it does not divide."""
    if total % world_size:
        raise ValueError(f"tensor_parallel={world_size} does not divide the {total} {what}")
    return total // world_size


class ColumnParallelLinear(nn.Linear):
    """`nn.Linear` over this rank's slice of the output features; output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool, world_size: int) -> None:
        super().__init__(in_features, shard_size(out_features, world_size, "output features"), bias)


class RowParallelLinear(nn.Module):
    """This rank's slice of the input features; the outputs are summed across ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool, world_size: int) -> None:
        super().__init__()
        local = shard_size(in_features, world_size, "input features")
        self.weight = nn.Parameter(torch.empty(out_features, local))  # (out, in / world)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        out = F.linear(x, self.weight)  # (T, out), this rank's partial sum
        dist.all_reduce(out)
        return out if self.bias is None else out + self.bias


def gather_vocab(local_logits: Tensor, world_size: int) -> Tensor:
    """(N, vocab / world) logits of this rank's vocabulary slice -> (N, vocab) on every rank."""
    parts = [torch.empty_like(local_logits) for _ in range(world_size)]
    dist.all_gather(parts, local_logits.contiguous())
    return torch.cat(parts, dim=-1)
