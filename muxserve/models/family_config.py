"""What each family's `config.json` means: one reader per family, the rules they share.

Torch-free (the planner reads configs on machines without torch). A reader gets the raw JSON
object and returns the `HFModelConfig` fields that differ between families: biases, sliding
windows, RoPE, tying, norms, soft-caps, experts. Each follows its transformers class's own
defaults, so a config.json that omits a key means what it means to transformers. Both the
transformers-4 keys (`rope_theta`, `rope_scaling`) and the transformers-5 key
(`rope_parameters`, nested by layer type for Gemma 3) are understood.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from muxserve.errors import CheckpointError

Raw = Mapping[str, Any]
Fields = dict[str, Any]
# raw config.json, the source named in errors -> the family's HFModelConfig fields
ConfigReader = Callable[[Raw, str], Fields]

# rope types whose parameters we implement (see muxserve/models/rope.py)
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
# gate activations we implement (see muxserve/models/decoder.py)
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh")
_ROPE_ALIASES = {"su": "longrope"}  # Phi-3's first checkpoints said "su"


# ---- shared rules -----------------------------------------------------------------------------
def parse_rope(
    raw: Raw, source: str, params: Mapping[str, Any] | None = None, theta: float | None = None
) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling or None) from `params` (default: the config's own keys)."""
    if params is None:
        nested = raw.get("rope_parameters")
        if isinstance(nested, dict) and "rope_theta" in nested:  # transformers >= 5
            params = nested
    if params is not None:
        base = float(params.get("rope_theta", theta if theta is not None else 10000.0))
        scaling: dict[str, Any] | None = dict(params)
    else:
        base = float(raw.get("rope_theta", theta if theta is not None else 10000.0))
        scaling = dict(raw["rope_scaling"]) if raw.get("rope_scaling") else None
    if scaling is None:
        return base, None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    rope_type = _ROPE_ALIASES.get(rope_type, rope_type)
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(
            f"{source}: rope type {rope_type!r} is not supported; "
            f"supported: {', '.join(ROPE_TYPES)}"
        )
    for key in ("type", "rope_theta", "partial_rotary_factor"):
        scaling.pop(key, None)
    scaling["rope_type"] = rope_type
    if rope_type in ("llama3", "yarn", "longrope"):  # as transformers' standardize_rope_params
        top = raw.get("original_max_position_embeddings")
        if top is not None:
            scaling["original_max_position_embeddings"] = int(top)
        else:
            scaling.setdefault(
                "original_max_position_embeddings", int(raw.get("max_position_embeddings", 2048))
            )
    if rope_type == "longrope":
        _check_longrope(scaling, source)
    return base, None if rope_type == "default" else scaling


def _check_longrope(scaling: dict[str, Any], source: str) -> None:
    for key in ("short_factor", "long_factor"):
        factors = scaling.get(key)
        if not isinstance(factors, list) or not all(
            isinstance(f, int | float) and not isinstance(f, bool) for f in factors
        ):
            raise CheckpointError(f"{source}: longrope needs {key!r}, a list of numbers")


def _layer_types(raw: Raw, layers: int, default: Callable[[int], bool]) -> tuple[bool, ...]:
    """Per layer: does it use the sliding window? `layer_types` if given, else `default(i)`."""
    types = raw.get("layer_types")
    if types is None:
        return tuple(default(i) for i in range(layers))
    return tuple(t == "sliding_attention" for t in types)


def _windows(window: Any, sliding: tuple[bool, ...]) -> tuple[int | None, ...]:
    if window is None:
        return (None,) * len(sliding)
    return tuple(int(window) if s else None for s in sliding)


def _every_layer_window(raw: Raw) -> tuple[int | None, ...]:
    """Mistral, Mixtral, Phi-3: `sliding_window` (if set) on every layer; layer_types ignored."""
    layers = int(raw["num_hidden_layers"])
    return _windows(raw.get("sliding_window"), (True,) * layers)


def _qwen_windows(raw: Raw) -> tuple[int | None, ...]:
    """Qwen2/Qwen3: a window only with `use_sliding_window`, on layers from `max_window_layers`."""
    layers = int(raw["num_hidden_layers"])
    if not raw.get("use_sliding_window", False):
        return (None,) * layers
    first = int(raw.get("max_window_layers", 28))
    return _windows(raw.get("sliding_window"), _layer_types(raw, layers, lambda i: i >= first))


def _tied(raw: Raw, default: bool) -> bool:
    return bool(raw.get("tie_word_embeddings", default))


# ---- one reader per family --------------------------------------------------------------------
def read_llama(raw: Raw, source: str) -> Fields:
    """Llama: optional biases (`attention_bias`, `mlp_bias`); no window, whatever it says."""
    theta, scaling = parse_rope(raw, source)
    bias = bool(raw.get("attention_bias", False))
    layers = int(raw["num_hidden_layers"])
    return {
        "rope_theta": theta,
        "rope_scaling": scaling,
        "qkv_bias": bias,
        "o_bias": bias,
        "mlp_bias": bool(raw.get("mlp_bias", False)),
        "layer_sliding_windows": (None,) * layers,
        "tie_word_embeddings": _tied(raw, False),
    }


def read_mistral(raw: Raw, source: str) -> Fields:
    """Mistral: no biases; `sliding_window` on every layer."""
    theta, scaling = parse_rope(raw, source)
    return {
        "rope_theta": theta,
        "rope_scaling": scaling,
        "layer_sliding_windows": _every_layer_window(raw),
        "tie_word_embeddings": _tied(raw, False),
    }


def read_qwen2(raw: Raw, source: str) -> Fields:
    """Qwen2: q/k/v always biased, o never; Qwen's window rule."""
    theta, scaling = parse_rope(raw, source)
    return {
        "rope_theta": theta,
        "rope_scaling": scaling,
        "qkv_bias": True,
        "layer_sliding_windows": _qwen_windows(raw),
        "tie_word_embeddings": _tied(raw, False),
    }


def read_qwen3(raw: Raw, source: str) -> Fields:
    """Qwen3: RMSNorm over each q and k head before RoPE; `attention_bias` on q/k/v and o."""
    theta, scaling = parse_rope(raw, source)
    bias = bool(raw.get("attention_bias", False))
    return {
        "rope_theta": theta,
        "rope_scaling": scaling,
        "qkv_bias": bias,
        "o_bias": bias,
        "qk_norm": True,
        "layer_sliding_windows": _qwen_windows(raw),
        "tie_word_embeddings": _tied(raw, False),
    }


def read_qwen3_moe(raw: Raw, source: str) -> Fields:
    """Qwen3-MoE: Qwen3's attention; routed experts on layers picked by `decoder_sparse_step`
    and `mlp_only_layers`; top-k weights renormalised only with `norm_topk_prob`."""
    fields = read_qwen3(raw, source)
    layers = int(raw["num_hidden_layers"])
    experts = int(raw.get("num_experts", raw.get("num_local_experts", 128)))
    step = int(raw.get("decoder_sparse_step", 1))
    dense = set(raw.get("mlp_only_layers") or [])
    fields.update(
        num_experts=experts,
        num_experts_per_tok=int(raw.get("num_experts_per_tok", 8)),
        moe_intermediate_size=int(raw.get("moe_intermediate_size", 768)),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        routing_in_model_dtype=True,
        moe_layers=tuple(
            i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(layers)
        ),
    )
    return fields


def read_mixtral(raw: Raw, source: str) -> Fields:
    """Mixtral: Mistral's attention; every layer's MLP is `num_local_experts` routed experts of
    `intermediate_size`, the top-k weights always renormalised."""
    fields = read_mistral(raw, source)
    layers = int(raw["num_hidden_layers"])
    fields.update(
        num_experts=int(raw.get("num_local_experts", raw.get("num_experts", 8))),
        num_experts_per_tok=int(raw.get("num_experts_per_tok", 2)),
        moe_intermediate_size=int(raw["intermediate_size"]),
        norm_topk_prob=True,
        moe_layers=(True,) * layers,
    )
    return fields


def _gemma_common(raw: Raw, softcaps: tuple[float | None, float | None]) -> Fields:
    """Gemma 2 and 3: GeGLU, (1 + w) norms around both blocks, embeddings scaled by
    sqrt(hidden), the attention scale from `query_pre_attn_scalar`, soft-capping."""
    attn_cap, final_cap = softcaps
    bias = bool(raw.get("attention_bias", False))
    return {
        "hidden_act": raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh",
        "qkv_bias": bias,
        "o_bias": bias,
        "norm_unit_offset": True,
        "sandwich_norms": True,
        "embed_scale": math.sqrt(int(raw["hidden_size"])),
        "query_pre_attn_scalar": float(raw.get("query_pre_attn_scalar", 256)),
        "attn_logit_softcap": raw.get("attn_logit_softcapping", attn_cap),
        "final_logit_softcap": raw.get("final_logit_softcapping", final_cap),
        "tie_word_embeddings": _tied(raw, True),
    }


def read_gemma2(raw: Raw, source: str) -> Fields:
    """Gemma 2: every other layer (0, 2, ...) slides; attention and final logits soft-capped."""
    theta, scaling = parse_rope(raw, source)
    layers = int(raw["num_hidden_layers"])
    sliding = _layer_types(raw, layers, lambda i: bool((i + 1) % 2))
    return {
        **_gemma_common(raw, (50.0, 30.0)),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "layer_sliding_windows": _windows(raw.get("sliding_window", 4096), sliding),
    }


def read_gemma3(raw: Raw, source: str) -> Fields:
    """Gemma 3 text: q/k norms; five sliding layers per global one (`sliding_window_pattern`);
    sliding layers rotate with their own base (`rope_local_base_freq`), global ones with
    `rope_theta` and its scaling; final logits soft-capped only if the config asks, attention
    scores never (as in transformers)."""
    layers = int(raw["num_hidden_layers"])
    pattern = int(raw.get("sliding_window_pattern", 6))
    sliding = _layer_types(raw, layers, lambda i: bool((i + 1) % pattern))
    nested = raw.get("rope_parameters")
    if isinstance(nested, dict) and "full_attention" in nested:  # transformers >= 5
        theta, scaling = parse_rope(raw, source, nested["full_attention"] or {}, 1_000_000.0)
        local = nested.get("sliding_attention") or {}
        local_theta = float(local.get("rope_theta", 10_000.0))
    else:
        theta, scaling = parse_rope(raw, source, theta=1_000_000.0)
        local_theta = float(raw.get("rope_local_base_freq", 10_000.0))
    return {
        **_gemma_common(raw, (None, None)),
        # transformers' Gemma 3 keeps attn_logit_softcapping but never applies it
        "attn_logit_softcap": None,
        "qk_norm": True,
        "rope_theta": theta,
        "rope_scaling": scaling,
        "sliding_rope_theta": local_theta,
        "layer_sliding_windows": _windows(raw.get("sliding_window", 4096), sliding),
    }


def read_phi3(raw: Raw, source: str) -> Fields:
    """Phi-3: fused projections (a checkpoint matter), `sliding_window` on every layer,
    `longrope` scaling, RoPE over `partial_rotary_factor` of each head."""
    theta, scaling = parse_rope(raw, source)
    params = raw.get("rope_parameters")
    factor = raw.get("partial_rotary_factor")
    if factor is None and isinstance(params, dict):
        factor = params.get("partial_rotary_factor")
    return {
        "rope_theta": theta,
        "rope_scaling": scaling,
        "partial_rotary_factor": float(factor if factor is not None else 1.0),
        "layer_sliding_windows": _every_layer_window(raw),
        "tie_word_embeddings": _tied(raw, False),
    }
