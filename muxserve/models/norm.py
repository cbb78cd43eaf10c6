"""RMSNorm, as the Llama family and as Gemma compute it."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale.

    The statistics are taken in float32. Llama-style (`unit_offset=False`): the normalised value
    is cast back to the input dtype before the scale multiplies it. Gemma-style
    (`unit_offset=True`): the scale is `1 + weight`, applied in float32 before the cast. Both
    exactly as transformers does, so bf16/fp16 match HF too.
    """

    def __init__(self, hidden_size: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        same = dtype == torch.float32  # then the casts are no-ops: skip their dispatch
        x32 = x if same else x.to(torch.float32)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.weight.float())).to(dtype)
        return self.weight * (normed if same else normed.to(dtype))

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, unit_offset={self.unit_offset}"
