"""A model's architecture, read from a Hugging Face `config.json`.

Torch-free: the planner computes sizes and FLOPs from it on a machine without torch. The keys
every family shares are read here; what differs between families (biases, windows, RoPE,
norms, experts) is read by the family's reader, found through `muxserve.models.registry`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muxserve.dtypes import DTYPE_BYTES
from muxserve.errors import CheckpointError
from muxserve.models.family_config import ACTIVATIONS, ROPE_TYPES
from muxserve.models.registry import SUPPORTED_ARCHITECTURES, family

__all__ = [
    "ACTIVATIONS",
    "ROPE_TYPES",
    "SUPPORTED_ARCHITECTURES",
    "HFModelConfig",
    "load_hf_config",
    "parse_hf_config",
]

# Sizes past these are no real model: a config asking for them is refused before anything is
# allocated (a hidden_size of 10^9 would ask for exabytes). Generous: 10x today's largest.
SIZE_LIMITS = {
    "vocab_size": 1 << 23,
    "hidden_size": 1 << 18,
    "intermediate_size": 1 << 20,
    "moe_intermediate_size": 1 << 20,
    "num_hidden_layers": 1 << 12,
    "num_attention_heads": 1 << 12,
    "num_key_value_heads": 1 << 12,
    "head_dim": 1 << 12,
    "max_position_embeddings": 1 << 27,
    "num_experts": 1 << 14,
}
MAX_PARAMS = 10**14  # 100T parameters


@dataclass(frozen=True)
class HFModelConfig:
    """The architecture fields MuxServe needs, with per-family defaults applied.

    The fields after `eos_token_ids` describe how a family departs from a Llama; their
    defaults are a Llama's.
    """

    architecture: str  # e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # the dense MLP's inner width
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (== num_heads for MHA, fewer for GQA)
    head_dim: int  # may differ from hidden_size // num_heads (explicit in some configs)
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # None, or with "rope_type" among ROPE_TYPES
    tie_word_embeddings: bool
    qkv_bias: bool  # bias on q/k/v projections (Qwen2 always; Llama with attention_bias)
    o_bias: bool  # bias on the output projection (Llama attention_bias)
    mlp_bias: bool  # bias on gate/up/down (Llama mlp_bias)
    layer_sliding_windows: tuple[int | None, ...]  # per layer: window in tokens, or None
    torch_dtype: str | None  # the checkpoint's dtype, if it says
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    hidden_act: str = "silu"  # the gate's activation: "silu" (SwiGLU), "gelu_pytorch_tanh"
    qk_norm: bool = False  # RMSNorm over each q and k head before RoPE (Qwen3, Gemma 3)
    norm_unit_offset: bool = False  # norms scale by (1 + w), in float32 (Gemma)
    sandwich_norms: bool = False  # norms after attention and around the MLP too (Gemma)
    embed_scale: float | None = None  # embeddings times this (Gemma: sqrt(hidden_size))
    query_pre_attn_scalar: float | None = None  # attention scale is this**-0.5 (Gemma)
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcap: float | None = None  # the same on the logits (Gemma 2)
    sliding_rope_theta: float | None = None  # sliding layers' own RoPE base (Gemma 3)
    partial_rotary_factor: float = 1.0  # RoPE rotates this fraction of each head (Phi)
    num_experts: int = 0  # routed experts per MoE layer (0: a dense model)
    num_experts_per_tok: int = 0  # experts each token is routed to (top-k)
    moe_intermediate_size: int = 0  # one expert's inner width
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1
    routing_in_model_dtype: bool = False  # routing weights cast to the model's dtype (Qwen3-MoE)
    moe_layers: tuple[bool, ...] = ()  # per layer: routed experts instead of the MLP

    # ---- derived sizes ---------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head RoPE rotates (all but for a partial factor)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_scale(self) -> float:
        """What q.k is multiplied by before the softmax."""
        base = self.query_pre_attn_scalar or self.head_dim
        return float(base) ** -0.5

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[layer]

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    def _layer_params(self, experts: int) -> int:
        """Parameters of all layers, counting `experts` experts in each MoE layer."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        if self.o_bias:
            attn += h
        if self.qk_norm:
            attn += 2 * self.head_dim
        mlp = 3 * h * i + (2 * i + h if self.mlp_bias else 0)
        moe = experts * 3 * h * self.moe_intermediate_size + self.num_experts * h  # + router
        norms = (4 if self.sandwich_norms else 2) * h
        moe_layers = self.num_moe_layers
        dense_layers = self.num_layers - moe_layers
        return self.num_layers * (attn + norms) + dense_layers * mlp + moe_layers * moe

    def num_params(self) -> int:
        """Parameter count, from the shapes alone; every expert counts (they are all held)."""
        v, h = self.vocab_size, self.hidden_size
        head = 0 if self.tie_word_embeddings else v * h
        return self._layer_params(self.num_experts) + v * h + head + h  # + final norm

    def active_params(self) -> int:
        """Parameters one token multiplies: only its `num_experts_per_tok` experts count."""
        v, h = self.vocab_size, self.hidden_size
        head = 0 if self.tie_word_embeddings else v * h
        return self._layer_params(self.num_experts_per_tok) + v * h + head + h

    def weight_bytes(self, dtype: str) -> int:
        return self.num_params() * DTYPE_BYTES[dtype]

    def kv_bytes_per_token(self, dtype: str) -> int:
        """Bytes of K and V that one token occupies across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES[dtype]

    def flops_per_token(self, context_len: int = 0) -> float:
        """Forward FLOPs for one token: 2 per multiply-add of the weights it uses (its routed
        experts only, not the embedding lookup), plus attention over `context_len` tokens."""
        dense = 2.0 * (self.active_params() - self.vocab_size * self.hidden_size)
        if self.tie_word_embeddings:
            dense += 2.0 * self.vocab_size * self.hidden_size  # the head still multiplies
        attention = 4.0 * self.num_layers * self.q_size * context_len  # QK^T and PV
        return dense + attention


def load_hf_config(path: str | Path) -> HFModelConfig:
    """Read `config.json` from a checkpoint folder (or the file itself)."""
    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    if not file.exists():
        raise CheckpointError(f"{file}: no config.json (is {p} a Hugging Face checkpoint folder?)")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return parse_hf_config(raw, source=str(file))


def parse_hf_config(raw: dict[str, Any], source: str = "config.json") -> HFModelConfig:
    """Validate a config dict; errors name `source` and the key.

    Sizes beyond `SIZE_LIMITS` are refused here, from config.json alone, before anything is
    allocated; an architecture not in the registry is refused naming the supported ones.
    """
    archs = raw.get("architectures") or []
    arch = archs[0] if archs else None
    reader = family(arch, source).read_config

    def need(key: str, value: Any = None) -> int:
        val = raw.get(key) if value is None else value
        if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
            raise CheckpointError(f"{source}: key {key!r} must be a positive integer, got {val!r}")
        limit = SIZE_LIMITS.get(key)
        if limit is not None and val > limit:
            raise CheckpointError(
                f"{source}: key {key!r} is {val}, beyond any real model (at most {limit}); "
                "refusing it before allocating anything"
            )
        return val

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    layers = need("num_hidden_layers")
    vocab, inter = need("vocab_size"), need("intermediate_size")
    kv_heads = need("num_key_value_heads", raw.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise CheckpointError(
            f"{source}: num_attention_heads ({heads}) is not a multiple of "
            f"num_key_value_heads ({kv_heads})"
        )
    head_dim = need("head_dim", raw.get("head_dim") or hidden // heads)
    mpe = need("max_position_embeddings", raw.get("max_position_embeddings") or 2048)
    fields = {"hidden_act": raw.get("hidden_act") or "silu", **reader(raw, source)}
    if fields["hidden_act"] not in ACTIVATIONS:
        raise CheckpointError(
            f"{source}: activation {fields['hidden_act']!r} is not supported; "
            f"supported: {', '.join(ACTIVATIONS)}"
        )
    for key in ("num_experts", "moe_intermediate_size"):
        if fields.get(key):
            need(key, fields[key])
    windows = fields.pop("layer_sliding_windows")
    if len(windows) != layers:
        raise CheckpointError(
            f"{source}: layer_types lists {len(windows)} layers, num_hidden_layers is {layers}"
        )
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    for tok in eos_ids:  # a stop token the model can never produce, or an index past the vocab
        if not isinstance(tok, int) or isinstance(tok, bool) or not 0 <= tok < vocab:
            raise CheckpointError(
                f"{source}: key 'eos_token_id' holds {tok!r}, not a token id in [0, {vocab})"
            )
    config = HFModelConfig(
        architecture=str(arch),
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        max_position_embeddings=mpe,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        layer_sliding_windows=windows,
        torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        **{"qkv_bias": False, "o_bias": False, "mlp_bias": False, **fields},
    )
    _check_experts(config, source)
    _check_rope(config, source)
    if config.num_params() > MAX_PARAMS:
        raise CheckpointError(
            f"{source}: these sizes make {config.num_params():.3g} parameters, beyond any real "
            f"model (at most {MAX_PARAMS:.0e}); refusing it before allocating anything"
        )
    return config


def _positive(value: Any) -> bool:
    """A finite number above zero (not a bool, not a string)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _check_rope(config: HFModelConfig, source: str) -> None:
    """RoPE bases and scaling factors no model has (a base <= 0 gives NaN angles, a factor <= 0
    a division by zero or mirrored positions), refused with the key named."""
    bases = {"rope_theta": config.rope_theta, "rope_local_base_freq": config.sliding_rope_theta}
    for key, base in bases.items():
        if base is not None and not _positive(base):
            raise CheckpointError(f"{source}: key {key!r} must be a positive number, got {base!r}")
    for key, value in (config.rope_scaling or {}).items():
        if not key.endswith("factor"):  # factor, low/high_freq_factor, attention_factor, ...
            continue
        values = value if isinstance(value, list) else [value]  # longrope's per-frequency lists
        bad = [v for v in values if v is not None and not _positive(v)]
        if bad:
            raise CheckpointError(
                f"{source}: key 'rope_scaling.{key}' must be a positive number, got {bad[0]!r}"
            )


def _check_experts(config: HFModelConfig, source: str) -> None:
    if not config.num_experts:
        return
    k = config.num_experts_per_tok
    if not 0 < k <= config.num_experts:
        raise CheckpointError(
            f"{source}: num_experts_per_tok ({k}) must be between 1 and the "
            f"{config.num_experts} experts"
        )


def check_divisible(config: HFModelConfig, world_size: int) -> None:
    """Raise a clear error when the model cannot be split `world_size` ways."""
    sizes = {
        "attention heads": config.num_heads,
        "KV heads": config.num_kv_heads,
        "intermediate size": config.intermediate_size,
    }
    if config.num_experts:
        sizes["expert intermediate size"] = config.moe_intermediate_size
    bad = [f"{what} ({n})" for what, n in sizes.items() if n % world_size]
    if bad:
        raise ValueError(
            f"tensor_parallel={world_size} must divide the model's {' and '.join(bad)}"
        )
