"""The decoder-only transformer most families are, driven by `HFModelConfig`.

Llama, Mistral, Qwen2, Qwen3, Gemma 2 and Gemma 3 are this class as it is; Phi-3 and the MoE
families subclass it for their checkpoints' names. What differs is read from the config:
biases, q/k norms, Gemma's (1 + w) norms around both blocks and scaled embeddings, the
attention scale and soft-caps, per-layer sliding windows with their own RoPE base, partial
RoPE, routed experts in place of the MLP. Module and parameter names follow transformers'.

With `tp_size > 1` the model is one rank's shard (see muxserve/parallel): q/k/v and gate/up are
column-parallel, o and down row-parallel, each rank holds `heads / tp_size` query and KV heads,
experts keep all of their number but a slice of their width, and an untied LM head is split by
vocabulary and gathered. Weights are sliced by `muxserve.models.sharding`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from muxserve.models.causal_lm import Attention, CausalLM
from muxserve.models.experts import SparseMoeBlock
from muxserve.models.hf_config import HFModelConfig
from muxserve.models.norm import RMSNorm
from muxserve.models.rope import RotaryEmbedding, apply_rotary
from muxserve.models.stacked import Stacked
from muxserve.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    gather_vocab,
    shard_size,
)

# one per name of family_config.ACTIVATIONS
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def make_norm(config: HFModelConfig, size: int) -> RMSNorm:
    return RMSNorm(size, config.rms_norm_eps, unit_offset=config.norm_unit_offset)


def linear(in_f: int, out_f: int, bias: bool, tp_size: int, parallel: type[nn.Module]) -> nn.Module:
    """`nn.Linear`, or its column/row-parallel shard under tensor parallelism."""
    if tp_size == 1:
        return nn.Linear(in_f, out_f, bias=bias)
    return parallel(in_f, out_f, bias, tp_size)


class GatedMLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)); SwiGLU or GeGLU."""

    def __init__(self, config: HFModelConfig, tp_size: int = 1) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = linear(h, i, bias, tp_size, ColumnParallelLinear)
        self.up_proj = linear(h, i, bias, tp_size, ColumnParallelLinear)
        self.down_proj = linear(i, h, bias, tp_size, RowParallelLinear)
        self.act = ACTIVATIONS[config.hidden_act]
        self.gate_up = Stacked(self.gate_proj, self.up_proj)  # one product where it can

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x)
        return self.down_proj(self.act(gate) * up)


class DecoderAttention(nn.Module):
    """q/k/v projections, optional q/k norms, RoPE, the runner's attention, the output."""

    def __init__(self, config: HFModelConfig, layer: int, tp_size: int = 1) -> None:
        super().__init__()
        self.layer = layer
        # this rank's heads: all of them without tensor parallelism
        self.num_heads = shard_size(config.num_heads, tp_size, "attention heads")
        self.num_kv_heads = shard_size(config.num_kv_heads, tp_size, "KV heads")
        self.head_dim = hd = config.head_dim
        h, bias = config.hidden_size, config.qkv_bias
        self.q_proj = linear(h, config.q_size, bias, tp_size, ColumnParallelLinear)
        self.k_proj = linear(h, config.kv_size, bias, tp_size, ColumnParallelLinear)
        self.v_proj = linear(h, config.kv_size, bias, tp_size, ColumnParallelLinear)
        self.o_proj = linear(config.q_size, h, config.o_bias, tp_size, RowParallelLinear)
        self.qkv = Stacked(self.q_proj, self.k_proj, self.v_proj)  # one product where it can
        self.q_norm: RMSNorm | None = make_norm(config, hd) if config.qk_norm else None
        self.k_norm: RMSNorm | None = make_norm(config, hd) if config.qk_norm else None
        # the attention applies 1/sqrt(head_dim); a config with another scale folds the ratio
        # into q
        ratio = config.attention_scale * hd**0.5
        self.q_scale: float | None = None if ratio == 1.0 else ratio
        # cos/sin hold one table, or two side by side when sliding layers have a base of their
        # own (Gemma 3): then this layer reads table 1 if it slides, else table 0
        self.rope_tables = 1 if config.sliding_rope_theta is None else 2
        sliding = config.layer_sliding_windows[layer] is not None
        self.rope_slot = int(self.rope_tables == 2 and sliding)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attention: Attention) -> Tensor:
        """x (T, hidden); cos/sin (T, 1, rotary width): one step's angles, over all heads."""
        t = x.shape[0]
        q, k, v = self.qkv(x)
        q = q.view(t, self.num_heads, self.head_dim)  # (T, nh, hd)
        k = k.view(t, self.num_kv_heads, self.head_dim)  # (T, nkv, hd)
        v = v.view(t, self.num_kv_heads, self.head_dim)  # (T, nkv, hd)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # over each head's hd
        c, s = cos, sin  # (T, 1, rotary_dim * rope_tables)
        if self.rope_tables > 1:
            width = cos.shape[-1] // self.rope_tables
            lo = self.rope_slot * width
            c, s = cos[..., lo : lo + width], sin[..., lo : lo + width]  # (T, 1, rotary_dim)
        q, k = apply_rotary(q, c, s), apply_rotary(k, c, s)
        if self.q_scale is not None:
            q = q * self.q_scale
        out = attention(self.layer, q, k, v)  # (T, nh, hd)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))  # (T, hidden)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); with sandwich norms (Gemma)
    each block's output is normed too: x + norm(attn(norm(x))), x + norm(mlp(norm(x)))."""

    def __init__(self, config: HFModelConfig, layer: int, tp_size: int = 1) -> None:
        super().__init__()
        h = config.hidden_size
        self.self_attn = DecoderAttention(config, layer, tp_size)
        self.mlp: nn.Module = (
            SparseMoeBlock(config, tp_size)
            if config.is_moe_layer(layer)
            else GatedMLP(config, tp_size)
        )
        self.input_layernorm = make_norm(config, h)
        self.post_attention_layernorm = make_norm(config, h)
        self.pre_feedforward_layernorm: RMSNorm | None = None
        self.post_feedforward_layernorm: RMSNorm | None = None
        if config.sandwich_norms:
            self.pre_feedforward_layernorm = make_norm(config, h)
            self.post_feedforward_layernorm = make_norm(config, h)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, attention: Attention) -> Tensor:
        attn = self.self_attn(self.input_layernorm(x), cos, sin, attention)
        pre, post = self.pre_feedforward_layernorm, self.post_feedforward_layernorm
        if pre is None or post is None:
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attn)
        return x + post(self.mlp(pre(x)))


class DecoderModel(nn.Module):
    """Embedding, decoder layers and final norm (HF's `model.` prefix), and the RoPE tables."""

    def __init__(self, config: HFModelConfig, tp_size: int = 1) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)  # replicated
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, tp_size) for i in range(config.num_layers)
        )
        self.norm = make_norm(config, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config)
        # sliding layers with a base of their own (Gemma 3): default RoPE at that base
        self.sliding_rotary_emb: RotaryEmbedding | None = None
        if config.sliding_rope_theta is not None:
            local = dataclasses.replace(
                config, rope_theta=config.sliding_rope_theta, rope_scaling=None
            )
            self.sliding_rotary_emb = RotaryEmbedding(local)
        self.embed_scale = config.embed_scale
        # the scale as a tensor per (device, dtype), made outside any CUDA graph capture
        self._scales: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def scale(self, like: Tensor) -> Tensor:
        """The embedding scale in `like`'s dtype, rounded from float32 as transformers does."""
        key = (like.device, like.dtype)
        if key not in self._scales:
            value = torch.tensor(self.embed_scale, dtype=torch.float32)
            self._scales[key] = value.to(like.dtype).to(like.device)
        return self._scales[key]


class DecoderForCausalLM(CausalLM):
    """A decoder-only causal LM; `config` decides everything its family changes."""

    def __init__(self, config: HFModelConfig, tp_size: int = 1) -> None:
        super().__init__(config, tp_size)
        self.model = DecoderModel(config, tp_size)
        # tied: the head reads embed_tokens.weight (whole on every rank) and there is no
        # lm_head parameter at all; untied under tensor parallelism: split by vocabulary
        self.vocab_parallel = (
            tp_size > 1 and not config.tie_word_embeddings and config.vocab_size % tp_size == 0
        )
        vocab = config.vocab_size // tp_size if self.vocab_parallel else config.vocab_size
        self.lm_head: nn.Linear | None = (
            None if config.tie_word_embeddings else nn.Linear(config.hidden_size, vocab, bias=False)
        )

    def rotary(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        cos, sin = self.model.rotary_emb(positions, dtype)  # (T, rd) each
        local = self.model.sliding_rotary_emb
        if local is None:
            return cos, sin
        lcos, lsin = local(positions, dtype)
        return torch.cat((cos, lcos), dim=-1), torch.cat((sin, lsin), dim=-1)  # (T, 2 rd)

    def forward_rotated(
        self, input_ids: Tensor, cos: Tensor, sin: Tensor, attention: Attention
    ) -> Tensor:
        m = self.model
        x = m.embed_tokens(input_ids)  # (T, hidden)
        if m.embed_scale is not None:
            x = x * m.scale(x)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (T, 1, rd): over heads, once per step
        for layer in m.layers:
            x = layer(x, cos, sin, attention)
        return m.norm(x)

    def head_weight(self) -> Tensor:
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return head

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """(N, hidden) -> (N, vocab) float32 logits; the matmul (and a final soft-cap) run in
        the model's dtype, as HF."""
        logits = F.linear(
            hidden, self.head_weight()
        )  # (N, vocab), or this rank's (N, vocab / tp_size)
        if self.vocab_parallel:
            logits = gather_vocab(logits, self.tp_size)
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    @torch.no_grad()
    def build_rope_cache(self, device: torch.device, max_len: int | None = None) -> None:
        self.model.rotary_emb.build_cache(device, max_len)
        if self.model.sliding_rotary_emb is not None:
            self.model.sliding_rotary_emb.build_cache(device, max_len)

    @classmethod
    def checkpoint_shapes(cls, config: HFModelConfig) -> dict[str, tuple[int, ...]]:
        return parameter_shapes(config)


def parameter_shapes(config: HFModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of `DecoderForCausalLM(config)`, by name, with its shape.

    Computed from the config alone (building even a meta-device model costs seconds the first
    time), so checkpoint validation stays cheap; a test keeps it equal to `named_parameters()`.
    For the dense families these are the checkpoint's names too.
    """
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv, hd = config.q_size, config.kv_size, config.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(config.num_layers):
        prefix = f"model.layers.{n}."
        linears = {
            "self_attn.q_proj": (q, h, config.qkv_bias),
            "self_attn.k_proj": (kv, h, config.qkv_bias),
            "self_attn.v_proj": (kv, h, config.qkv_bias),
            "self_attn.o_proj": (h, q, config.o_bias),
        }
        if not config.is_moe_layer(n):
            linears |= {
                "mlp.gate_proj": (i, h, config.mlp_bias),
                "mlp.up_proj": (i, h, config.mlp_bias),
                "mlp.down_proj": (h, i, config.mlp_bias),
            }
        for name, (out_features, in_features, bias) in linears.items():
            shapes[f"{prefix}{name}.weight"] = (out_features, in_features)
            if bias:
                shapes[f"{prefix}{name}.bias"] = (out_features,)
        if config.qk_norm:
            shapes[f"{prefix}self_attn.q_norm.weight"] = (hd,)
            shapes[f"{prefix}self_attn.k_norm.weight"] = (hd,)
        if config.is_moe_layer(n):
            e, mi = config.num_experts, config.moe_intermediate_size
            shapes[f"{prefix}mlp.gate.weight"] = (e, h)
            shapes[f"{prefix}mlp.experts.gate_proj"] = (e, mi, h)
            shapes[f"{prefix}mlp.experts.up_proj"] = (e, mi, h)
            shapes[f"{prefix}mlp.experts.down_proj"] = (e, h, mi)
        norms = ["input_layernorm", "post_attention_layernorm"]
        if config.sandwich_norms:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        for norm in norms:
            shapes[f"{prefix}{norm}.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes
