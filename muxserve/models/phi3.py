"""Phi-3: the decoder, read from a checkpoint with fused q/k/v and gate/up projections.

The checkpoint's `self_attn.qkv_proj` is q, k and v stacked by rows and `mlp.gate_up_proj` is
gate then up; they are split on load into the decoder's own projections, so that tensor
parallelism slices each one by heads or features like any other family. Everything else
(`longrope` scaling, partial RoPE, a window on every layer) is read from the config.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import Tensor

from muxserve.models.decoder import DecoderForCausalLM, parameter_shapes
from muxserve.models.hf_config import HFModelConfig

_SPLIT = re.compile(r"(.*)\.(self_attn\.(q|k|v)_proj|mlp\.(gate|up)_proj)\.weight")


class Phi3ForCausalLM(DecoderForCausalLM):
    """Phi-3 (mini, small-context and long-context, medium); Phi-4-mini's layout too."""

    @classmethod
    def checkpoint_shapes(cls, config: HFModelConfig) -> dict[str, tuple[int, ...]]:
        h, i = config.hidden_size, config.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {}
        for name, shape in parameter_shapes(config).items():
            match = _SPLIT.fullmatch(name)
            if match is None:
                shapes[name] = shape
            elif match.group(3) == "q":
                shapes[f"{match.group(1)}.self_attn.qkv_proj.weight"] = (
                    config.q_size + 2 * config.kv_size,
                    h,
                )
            elif match.group(4) == "gate":
                shapes[f"{match.group(1)}.mlp.gate_up_proj.weight"] = (2 * i, h)
        return shapes

    @torch.no_grad()
    def load_weights(self, tensors: Iterable[tuple[str, Tensor]]) -> None:
        params = dict(self.named_parameters())
        c = self.config
        for name, tensor in tensors:
            if name.endswith(".self_attn.qkv_proj.weight"):
                prefix = name.removesuffix("qkv_proj.weight")
                q, k, v = tensor.split([c.q_size, c.kv_size, c.kv_size])  # rows: q, then k, v
                for part, value in (("q", q), ("k", k), ("v", v)):
                    params[f"{prefix}{part}_proj.weight"].copy_(value)
            elif name.endswith(".mlp.gate_up_proj.weight"):
                prefix = name.removesuffix("gate_up_proj.weight")
                gate, up = tensor.chunk(2)  # rows: gate, then up
                params[f"{prefix}gate_proj.weight"].copy_(gate)
                params[f"{prefix}up_proj.weight"].copy_(up)
            else:
                params[name].copy_(tensor)
