"""The protocol every model family implements: `CausalLM`, and the `Attention` it is given.

Tokens of all sequences of a batch are flattened into one axis T; attention over the KV cache is
not done by the model but by an `Attention` the runner passes in, since only the runner knows
which token belongs to which sequence and where each sequence's cache lives.

The runner, the CUDA graphs, the loader, tensor-parallel sharding and the executors use only
what is declared here; `muxserve.models.registry` maps an architecture name to its class.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
from torch import Tensor, nn

from muxserve.models.hf_config import HFModelConfig


class Attention(Protocol):
    """Attention over the KV cache, supplied by the runner; it knows the batch layout.

    `q`: (T, num_heads, head_dim) after RoPE; `k`, `v`: (T, num_kv_heads, head_dim), `k` after
    RoPE; returns (T, num_heads, head_dim). T = all tokens of all sequences of the batch,
    flattened. The implementation stores k/v in its cache and applies the 1/sqrt(head_dim) scale
    (a model with another scale folds it into q), causal masking, GQA (query head h reads KV
    head h // (num_heads // num_kv_heads)), the layer's sliding window
    `config.layer_sliding_windows[layer]` (with a window w, a query at position p sees keys at
    positions p - w < p_k <= p: w keys, itself included, as in HF) and, where the config has
    one, `config.attn_logit_softcap` on the scores.
    """

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...


class CausalLM(nn.Module):
    """A causal language model of some family, possibly one tensor-parallel rank's shard.

    Parameter names follow the model's structure (mostly transformers' own); `checkpoint_shapes`
    names the tensors of a Hugging Face checkpoint and `load_weights` puts each where it goes, so
    a family whose checkpoint fuses or splits tensors differently maps them there. With
    `tp_size > 1` the model holds one rank's slice of every split parameter, at the same name,
    split along exactly one dimension (see `muxserve.models.sharding`).
    """

    config: HFModelConfig
    tp_size: int

    def __init__(self, config: HFModelConfig, tp_size: int = 1) -> None:
        super().__init__()
        self.config = config
        self.tp_size = tp_size

    # ---- the forward pass -----------------------------------------------------------------
    def forward(self, input_ids: Tensor, positions: Tensor, attention: Attention) -> Tensor:
        """Final hidden states (T, hidden) after the last norm, for (T,) int64 ids and positions."""
        cos, sin = self.rotary(positions, self.dtype)
        return self.forward_rotated(input_ids, cos, sin, attention)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights (and activations) are in."""
        return next(self.parameters()).dtype

    def rotary(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin (T, rotary width) for (T,) positions; may sync with the host."""
        raise NotImplementedError

    def forward_rotated(
        self, input_ids: Tensor, cos: Tensor, sin: Tensor, attention: Attention
    ) -> Tensor:
        """`forward` with `rotary`'s cos/sin given: no host sync, so a CUDA graph captures it."""
        raise NotImplementedError

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """(N, hidden) -> (N, vocab) float32 logits on every rank."""
        raise NotImplementedError

    def head_weight(self) -> Tensor:
        """The (vocab or this rank's share of it, hidden) matrix `compute_logits` multiplies
        by: the LM head, or the embedding when the two are tied (the CPU loader places it
        apart, see `weight_arena`)."""
        raise NotImplementedError

    @torch.no_grad()
    def build_rope_cache(self, device: torch.device, max_len: int | None = None) -> None:
        """Allocate RoPE tables (and other derived state) on `device` now, before the KV pool
        takes the rest of the memory: for `max_len` positions, the served context (default
        the config's `max_position_embeddings`)."""
        raise NotImplementedError

    @property
    def graph_safe(self) -> bool:
        """Whether a decode step may be captured in a CUDA graph (the kernels' attention,
        static shapes): False for soft-capped attention and routed experts."""
        return self.config.attn_logit_softcap is None and not self.config.num_experts

    # ---- weights --------------------------------------------------------------------------
    @classmethod
    def checkpoint_shapes(cls, config: HFModelConfig) -> dict[str, tuple[int, ...]]:
        """Every tensor of a Hugging Face checkpoint of `config`, by name, with its shape."""
        raise NotImplementedError

    @torch.no_grad()
    def load_weights(self, tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Copy checkpoint tensors (named as in `checkpoint_shapes`, whole) into the parameters,
        cast to their dtype; default: each tensor is the parameter of the same name."""
        params = dict(self.named_parameters())
        for name, tensor in tensors:
            params[name].copy_(tensor)
