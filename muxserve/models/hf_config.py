"""A Llama-family model's architecture, read from a Hugging Face `config.json`.

Torch-free: the planner computes sizes and FLOPs from it on a machine without torch.
Both the transformers-4 keys (`rope_theta`, `rope_scaling`) and the transformers-5 key
(`rope_parameters`) are understood.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muxserve.dtypes import DTYPE_BYTES
from muxserve.errors import CheckpointError, UnsupportedArchitectureError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# rope types whose parameters we implement (see muxserve/models/rope.py)
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class HFModelConfig:
    """The architecture fields MuxServe needs, with per-family defaults applied."""

    architecture: str  # e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # SwiGLU inner width
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

    # ---- derived sizes ---------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        """Parameter count, from the shapes alone."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        if self.o_bias:
            attn += h
        mlp = 3 * h * i + (2 * i + h if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * h  # two RMSNorm weights
        embed = v * h
        head = 0 if self.tie_word_embeddings else v * h
        return self.num_layers * per_layer + embed + head + h  # final norm

    def weight_bytes(self, dtype: str) -> int:
        return self.num_params() * DTYPE_BYTES[dtype]

    def kv_bytes_per_token(self, dtype: str) -> int:
        """Bytes of K and V that one token occupies across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES[dtype]

    def flops_per_token(self, context_len: int = 0) -> float:
        """Forward FLOPs for one token: 2 per weight multiply-add, plus attention over context."""
        dense = 2.0 * (self.num_params() - self.vocab_size * self.hidden_size)
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
    """Validate a config dict; errors name `source` and the key."""
    archs = raw.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{source}: architecture {arch!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def need(key: str) -> int:
        val = raw.get(key)
        if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
            raise CheckpointError(f"{source}: key {key!r} must be a positive integer, got {val!r}")
        return val

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    layers = need("num_hidden_layers")
    kv_heads = raw.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise CheckpointError(
            f"{source}: num_attention_heads ({heads}) is not a multiple of "
            f"num_key_value_heads ({kv_heads})"
        )
    head_dim = raw.get("head_dim") or hidden // heads
    rope_theta, rope_scaling = _parse_rope(raw, source)

    is_qwen2 = arch == "Qwen2ForCausalLM"
    # only transformers' Llama reads these two; Mistral and Qwen2 hard-code their biases
    is_llama = arch == "LlamaForCausalLM"
    attention_bias = is_llama and bool(raw.get("attention_bias", False))
    windows = _sliding_windows(raw, arch, layers)

    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return HFModelConfig(
        architecture=arch,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        intermediate_size=need("intermediate_size"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=is_qwen2 or attention_bias,
        o_bias=(not is_qwen2) and attention_bias,
        mlp_bias=is_llama and bool(raw.get("mlp_bias", False)),
        layer_sliding_windows=windows,
        torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def _parse_rope(raw: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:  # transformers >= 5
        theta = float(params["rope_theta"])
        scaling: dict[str, Any] | None = dict(params)
    else:
        theta = float(raw.get("rope_theta", 10000.0))
        scaling = dict(raw["rope_scaling"]) if raw.get("rope_scaling") else None
    if scaling is None:
        return theta, None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"{source}: rope type {rope_type!r} is not supported; "
            f"supported: {', '.join(ROPE_TYPES)}"
        )
    scaling.pop("type", None)
    scaling.pop("rope_theta", None)
    scaling["rope_type"] = rope_type
    if rope_type in ("llama3", "yarn"):  # as transformers' standardize_rope_params fills it in
        top = raw.get("original_max_position_embeddings")
        if top is not None:
            scaling["original_max_position_embeddings"] = int(top)
        else:
            scaling.setdefault(
                "original_max_position_embeddings", int(raw.get("max_position_embeddings", 2048))
            )
    return theta, None if rope_type == "default" else scaling


def _sliding_windows(raw: dict[str, Any], arch: str, layers: int) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    if arch == "LlamaForCausalLM":  # transformers' Llama has no window, whatever the config says
        window = None
    if arch == "Qwen2ForCausalLM" and not raw.get("use_sliding_window", False):
        window = None
    if window is None:
        return (None,) * layers
    if arch == "MistralForCausalLM":  # transformers' Mistral ignores layer_types
        return (int(window),) * layers
    types = raw.get("layer_types")
    if types is None:
        if arch == "Qwen2ForCausalLM":
            first = int(raw.get("max_window_layers", 28))
            types = ["sliding_attention" if i >= first else "full" for i in range(layers)]
        else:
            types = ["sliding_attention"] * layers
    return tuple(int(window) if t == "sliding_attention" else None for t in types)
