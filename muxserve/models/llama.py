"""The Llama family (Llama, Mistral, Qwen2) as one torch model, driven by `HFModelConfig`.

Tokens of all sequences of a batch are flattened into one axis T; attention over the KV cache is
not done here but by an `Attention` the runner passes in, since only the runner knows which
token belongs to which sequence and where each sequence's cache lives. Module and parameter
names follow transformers', so an HF state dict loads by name.

With `tp_size > 1` the model is one rank's shard (see muxserve/parallel): q/k/v and gate/up are
column-parallel, o and down row-parallel, each rank holds `heads / tp_size` query and KV heads,
and an untied LM head is split by vocabulary and gathered. Weights are sliced by the loader.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from muxserve.models.hf_config import HFModelConfig
from muxserve.models.norm import RMSNorm
from muxserve.models.rope import RotaryEmbedding, apply_rotary
from muxserve.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    gather_vocab,
    shard_size,
)


class Attention(Protocol):
    """Attention over the KV cache, supplied by the runner; it knows the batch layout.

    `q`: (T, num_heads, head_dim) after RoPE; `k`, `v`: (T, num_kv_heads, head_dim), `k` after
    RoPE; returns (T, num_heads, head_dim). T = all tokens of all sequences of the batch,
    flattened. The implementation stores k/v in its cache and applies the 1/sqrt(head_dim) scale,
    causal masking, GQA (query head h reads KV head h // (num_heads // num_kv_heads)) and the
    layer's sliding window `config.layer_sliding_windows[layer]`: with a window w, a query at
    position p sees keys at positions p - w < p_k <= p (w keys, itself included), as in HF.
    """

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: HFModelConfig, tp_size: int = 1) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj: nn.Module
        self.up_proj: nn.Module
        self.down_proj: nn.Module
        if tp_size == 1:
            self.gate_proj = nn.Linear(h, i, bias=bias)
            self.up_proj = nn.Linear(h, i, bias=bias)
            self.down_proj = nn.Linear(i, h, bias=bias)
        else:
            self.gate_proj = ColumnParallelLinear(h, i, bias, tp_size)
            self.up_proj = ColumnParallelLinear(h, i, bias, tp_size)
            self.down_proj = RowParallelLinear(i, h, bias, tp_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaAttention(nn.Module):
    """q/k/v projections, RoPE, the runner's attention, and the output projection."""

    def __init__(self, config: HFModelConfig, layer: int, tp_size: int = 1) -> None:
        super().__init__()
        self.layer = layer
        # this rank's heads: all of them without tensor parallelism
        self.num_heads = shard_size(config.num_heads, tp_size, "attention heads")
        self.num_kv_heads = shard_size(config.num_kv_heads, tp_size, "KV heads")
        self.head_dim = config.head_dim
        h, bias = config.hidden_size, config.qkv_bias
        self.q_proj: nn.Module
        self.k_proj: nn.Module
        self.v_proj: nn.Module
        self.o_proj: nn.Module
        if tp_size == 1:
            self.q_proj = nn.Linear(h, config.q_size, bias=bias)
            self.k_proj = nn.Linear(h, config.kv_size, bias=bias)
            self.v_proj = nn.Linear(h, config.kv_size, bias=bias)
            self.o_proj = nn.Linear(config.q_size, h, bias=config.o_bias)
        else:
            self.q_proj = ColumnParallelLinear(h, config.q_size, bias, tp_size)
            self.k_proj = ColumnParallelLinear(h, config.kv_size, bias, tp_size)
            self.v_proj = ColumnParallelLinear(h, config.kv_size, bias, tp_size)
            self.o_proj = RowParallelLinear(config.q_size, h, config.o_bias, tp_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attention: Attention) -> Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)  # (T, nh, hd)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)  # (T, nkv, hd)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)  # (T, nkv, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attention(self.layer, q, k, v)  # (T, nh, hd)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))  # (T, hidden)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: HFModelConfig, layer: int, tp_size: int = 1) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer, tp_size)
        self.mlp = LlamaMLP(config, tp_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attention: Attention) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm (HF's `model.` prefix)."""

    def __init__(self, config: HFModelConfig, tp_size: int = 1) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)  # replicated
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, tp_size) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids: Tensor, positions: Tensor, attention: Attention) -> Tensor:
        x = self.embed_tokens(input_ids)  # (T, hidden)
        cos, sin = self.rotary_emb(positions, x.dtype)  # (T, hd) each, shared by all layers
        for layer in self.layers:
            x = layer(x, cos, sin, attention)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """A Llama, Mistral or Qwen2 causal LM; `config` decides biases, GQA, windows, RoPE, tying."""

    def __init__(self, config: HFModelConfig, tp_size: int = 1) -> None:
        super().__init__()
        self.config = config
        self.tp_size = tp_size
        self.model = LlamaModel(config, tp_size)
        # tied: the head reads embed_tokens.weight (whole on every rank) and there is no
        # lm_head parameter at all; untied under tensor parallelism: split by vocabulary
        self.vocab_parallel = (
            tp_size > 1 and not config.tie_word_embeddings and config.vocab_size % tp_size == 0
        )
        vocab = config.vocab_size // tp_size if self.vocab_parallel else config.vocab_size
        self.lm_head: nn.Linear | None = (
            None if config.tie_word_embeddings else nn.Linear(config.hidden_size, vocab, bias=False)
        )

    def forward(self, input_ids: Tensor, positions: Tensor, attention: Attention) -> Tensor:
        """Final hidden states (T, hidden) after the last norm, for (T,) int64 ids and positions."""
        return self.model(input_ids, positions, attention)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """(N, hidden) -> (N, vocab) float32 logits; the matmul runs in the model's dtype, as HF."""
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden, head)  # (N, vocab), or this rank's (N, vocab / tp_size)
        if self.vocab_parallel:
            logits = gather_vocab(logits, self.tp_size)
        return logits.float()

    @torch.no_grad()
    def build_rope_cache(self, device: torch.device) -> None:
        """Allocate the RoPE cos/sin table on `device` now, before the KV pool takes the rest."""
        self.model.rotary_emb.build_cache(device)


def parameter_shapes(config: HFModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of `LlamaForCausalLM(config)`, by HF name, with its shape.

    Computed from the config alone (building even a meta-device model costs seconds the first
    time), so checkpoint validation stays cheap; a test keeps it equal to `named_parameters()`.
    """
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.q_size, config.kv_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(config.num_layers):
        prefix = f"model.layers.{n}."
        linears = {
            "self_attn.q_proj": (q, h, config.qkv_bias),
            "self_attn.k_proj": (kv, h, config.qkv_bias),
            "self_attn.v_proj": (kv, h, config.qkv_bias),
            "self_attn.o_proj": (h, q, config.o_bias),
            "mlp.gate_proj": (i, h, config.mlp_bias),
            "mlp.up_proj": (i, h, config.mlp_bias),
            "mlp.down_proj": (h, i, config.mlp_bias),
        }
        for name, (out_features, in_features, bias) in linears.items():
            shapes[f"{prefix}{name}.weight"] = (out_features, in_features)
            if bias:
                shapes[f"{prefix}{name}.bias"] = (out_features,)
        shapes[f"{prefix}input_layernorm.weight"] = (h,)
        shapes[f"{prefix}post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes
