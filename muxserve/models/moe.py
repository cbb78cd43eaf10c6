"""Mixtral and Qwen3-MoE: the decoder with routed experts, read from per-expert checkpoints.

The model stacks each layer's experts into (E, ...) parameters (`mlp.experts.gate_proj`, ...)
so that they run as grouped GEMMs (muxserve/models/experts.py); checkpoints on the Hub store
one tensor per expert and projection. Each class names its checkpoint's tensors and maps them:

- Mixtral: `block_sparse_moe.gate`, `block_sparse_moe.experts.{e}.w1/w3/w2` (gate/up/down);
- Qwen3-MoE: `mlp.gate`, `mlp.experts.{e}.gate_proj/up_proj/down_proj`; layers outside the
  sparse step (or in `mlp_only_layers`) keep a dense `mlp`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import Tensor

from muxserve.models.decoder import DecoderForCausalLM, parameter_shapes
from muxserve.models.hf_config import HFModelConfig

_EXPERT = re.compile(r"model\.layers\.(\d+)\.(\w+)\.experts\.(\d+)\.(\w+)\.weight")


class _RoutedExpertsLM(DecoderForCausalLM):
    """Maps per-expert checkpoint tensors onto stacked expert parameters."""

    block: ClassVar[str]  # the checkpoint's name of an MoE layer's block ("mlp", ...)
    projections: ClassVar[dict[str, str]]  # checkpoint projection -> "gate_proj" | "up_proj" | ...

    @classmethod
    def checkpoint_shapes(cls, config: HFModelConfig) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for name, shape in parameter_shapes(config).items():
            match = re.fullmatch(r"(model\.layers\.\d+\.)mlp\.(gate\.weight|experts\.(\w+))", name)
            if match is None:
                shapes[name] = shape
            elif match.group(3) is None:  # the router
                shapes[f"{match.group(1)}{cls.block}.gate.weight"] = shape
            else:
                ours = match.group(3)
                theirs = next(k for k, v in cls.projections.items() if v == ours)
                for e in range(config.num_experts):
                    shapes[f"{match.group(1)}{cls.block}.experts.{e}.{theirs}.weight"] = shape[1:]
        return shapes

    @torch.no_grad()
    def load_weights(self, tensors: Iterable[tuple[str, Tensor]]) -> None:
        params = dict(self.named_parameters())
        router = f".{self.block}.gate.weight"
        for name, tensor in tensors:
            match = _EXPERT.fullmatch(name)
            if match is not None and match.group(2) == self.block:
                layer, expert, proj = match.group(1), int(match.group(3)), match.group(4)
                stacked = params[f"model.layers.{layer}.mlp.experts.{self.projections[proj]}"]
                stacked[expert].copy_(tensor)
            elif name.endswith(router):
                params[name.removesuffix(router) + ".mlp.gate.weight"].copy_(tensor)
            else:
                params[name].copy_(tensor)


class MixtralForCausalLM(_RoutedExpertsLM):
    """Mixtral: every layer's MLP is routed experts named w1 (gate), w3 (up), w2 (down)."""

    block: ClassVar[str] = "block_sparse_moe"
    projections: ClassVar[dict[str, str]] = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


class Qwen3MoeForCausalLM(_RoutedExpertsLM):
    """Qwen3-MoE: Qwen3's attention, routed experts named like a dense MLP."""

    block: ClassVar[str] = "mlp"
    projections: ClassVar[dict[str, str]] = {
        "gate_proj": "gate_proj",
        "up_proj": "up_proj",
        "down_proj": "down_proj",
    }
