"""hf_config reads the fields our model needs the way transformers' own model classes do."""

from __future__ import annotations

from typing import Any

import pytest

from muxserve.errors import CheckpointError, UnsupportedArchitectureError
from muxserve.models.hf_config import parse_hf_config

transformers = pytest.importorskip("transformers")

SMALL = {
    "vocab_size": 10,
    "hidden_size": 32,
    "intermediate_size": 8,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 64,
}


def raw(arch: str, **fields: Any) -> dict[str, Any]:
    return {"architectures": [arch], **SMALL, **fields}


def test_llama_has_no_window_even_if_the_config_names_one() -> None:
    config = parse_hf_config(raw("LlamaForCausalLM", sliding_window=8))
    assert config.layer_sliding_windows == (None, None, None)


def test_mistral_windows_every_layer_and_ignores_biases() -> None:
    config = parse_hf_config(
        raw(
            "MistralForCausalLM",
            sliding_window=8,
            layer_types=["full_attention", "sliding_attention", "full_attention"],
            attention_bias=True,
            mlp_bias=True,
        )
    )
    assert config.layer_sliding_windows == (8, 8, 8)
    assert not (config.qkv_bias or config.o_bias or config.mlp_bias)


def test_qwen2_windows_layers_from_max_window_layers() -> None:
    hf = transformers.Qwen2Config(
        **SMALL, use_sliding_window=True, sliding_window=8, max_window_layers=1
    )
    config = parse_hf_config({**hf.to_dict(), "architectures": ["Qwen2ForCausalLM"]})
    assert config.layer_sliding_windows == (None, 8, 8)
    assert config.qkv_bias and not config.o_bias


def test_llama_biases() -> None:
    config = parse_hf_config(raw("LlamaForCausalLM", attention_bias=True, mlp_bias=True))
    assert config.qkv_bias and config.o_bias and config.mlp_bias


@pytest.mark.parametrize("rope_type", ["yarn", "llama3"])
def test_original_max_positions_defaults_as_in_transformers(rope_type: str) -> None:
    scaling = {
        "rope_type": rope_type,
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    }
    config = parse_hf_config(raw("LlamaForCausalLM", rope_scaling=scaling))
    hf = transformers.LlamaConfig(**SMALL, rope_scaling=dict(scaling))
    assert config.rope_scaling is not None
    assert (
        config.rope_scaling["original_max_position_embeddings"]
        == hf.rope_parameters["original_max_position_embeddings"]
        == 64
    )
    top = parse_hf_config(
        raw("LlamaForCausalLM", rope_scaling=scaling, original_max_position_embeddings=16)
    )
    assert top.rope_scaling is not None
    assert top.rope_scaling["original_max_position_embeddings"] == 16


# ---- the newer families, from configs as the Hub has them (transformers-4 keys) -----------------
def test_gemma2_defaults_follow_transformers() -> None:
    """A Gemma 2 config.json without the soft-cap keys still caps (50 / 30), ties, scales."""
    config = parse_hf_config(
        raw("Gemma2ForCausalLM", head_dim=16, hidden_act="gelu_pytorch_tanh", sliding_window=4)
    )
    assert (config.attn_logit_softcap, config.final_logit_softcap) == (50.0, 30.0)
    assert config.layer_sliding_windows == (4, None, 4)  # layers 0, 2 slide
    assert config.tie_word_embeddings and config.norm_unit_offset and config.sandwich_norms
    assert config.embed_scale == 32**0.5 and config.attention_scale == 256**-0.5
    assert config.hidden_act == "gelu_pytorch_tanh" and not config.qk_norm


def test_gemma3_reads_both_rope_bases_old_and_new_keys() -> None:
    old = parse_hf_config(
        raw(
            "Gemma3ForCausalLM",
            num_hidden_layers=6,
            rope_theta=1e6,
            rope_local_base_freq=1e4,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
            sliding_window=512,
            attn_logit_softcapping=50.0,
        )
    )
    hf = transformers.Gemma3TextConfig(
        **{**SMALL, "num_hidden_layers": 6},
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
        sliding_window=512,
    )
    new = parse_hf_config({**hf.to_dict(), "architectures": ["Gemma3ForCausalLM"]})
    for config in (old, new):
        assert (config.rope_theta, config.sliding_rope_theta) == (1e6, 1e4)
        assert config.rope_scaling == {"rope_type": "linear", "factor": 8.0}
        assert config.layer_sliding_windows == (512,) * 5 + (None,)  # one global in six
        assert config.qk_norm and config.attn_logit_softcap is None  # HF never applies it


def test_phi3_su_is_longrope_and_partial_rotary() -> None:
    scaling = {"type": "su", "short_factor": [1.0] * 6, "long_factor": [2.0] * 6}
    config = parse_hf_config(
        raw(
            "Phi3ForCausalLM",
            rope_scaling=scaling,
            original_max_position_embeddings=16,
            partial_rotary_factor=0.75,
            sliding_window=7,
        )
    )
    assert config.rope_scaling == {
        "rope_type": "longrope",
        "short_factor": [1.0] * 6,
        "long_factor": [2.0] * 6,
        "original_max_position_embeddings": 16,
    }
    assert config.rotary_dim == 6 and config.layer_sliding_windows == (7, 7, 7)


def test_phi3_longrope_needs_its_factors() -> None:
    with pytest.raises(CheckpointError, match="longrope needs 'long_factor'"):
        parse_hf_config(
            raw("Phi3ForCausalLM", rope_scaling={"type": "longrope", "short_factor": [1.0] * 4})
        )


def test_qwen3_moe_experts_either_key_and_dense_layers() -> None:
    fields = {"moe_intermediate_size": 4, "num_experts_per_tok": 2, "mlp_only_layers": [1]}
    for key in ("num_experts", "num_local_experts"):
        config = parse_hf_config(raw("Qwen3MoeForCausalLM", **{key: 6}, **fields))
        assert (config.num_experts, config.moe_layers) == (6, (True, False, True))
        assert not config.norm_topk_prob and config.routing_in_model_dtype and config.qk_norm
    stepped = parse_hf_config(
        raw("Qwen3MoeForCausalLM", num_experts=6, decoder_sparse_step=2, **fields)
    )
    assert stepped.moe_layers == (False, False, False)  # only layer 1 would, and it is dense


def test_mixtral_experts_and_accounting() -> None:
    """Memory holds every expert; a token's FLOPs use only its top-k."""
    config = parse_hf_config(raw("MixtralForCausalLM", num_local_experts=8, num_experts_per_tok=2))
    h, i, layers = 32, 8, 3
    expert = 3 * h * i
    assert config.moe_layers == (True,) * layers and config.moe_intermediate_size == i
    dense = parse_hf_config(raw("MistralForCausalLM"))  # the same model with one plain MLP
    assert config.num_params() - dense.num_params() == layers * (7 * expert + 8 * h)
    assert config.active_params() - dense.active_params() == layers * (expert + 8 * h)
    assert config.flops_per_token() - dense.flops_per_token() == 2.0 * layers * (expert + 8 * h)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hidden_size", 10**9, "key 'hidden_size' is 1000000000, beyond any real model"),
        ("vocab_size", 10**8, "key 'vocab_size' is 100000000, beyond any real model"),
        ("num_hidden_layers", 10**5, "key 'num_hidden_layers' is 100000"),
        ("intermediate_size", -4, "key 'intermediate_size' must be a positive integer"),
    ],
)
def test_absurd_sizes_are_refused_from_the_config_alone(
    field: str, value: int, message: str
) -> None:
    with pytest.raises(CheckpointError, match=message):
        parse_hf_config(raw("LlamaForCausalLM", **{field: value}), source="x/config.json")


def test_sizes_each_plausible_but_too_many_parameters() -> None:
    with pytest.raises(CheckpointError, match=r"make 1\.\d+e\+15 parameters, beyond any real"):
        parse_hf_config(
            raw(
                "LlamaForCausalLM",
                hidden_size=1 << 17,
                intermediate_size=1 << 19,
                num_hidden_layers=4000,
                num_attention_heads=1024,
                num_key_value_heads=1024,
            )
        )


def test_unsupported_architecture_names_every_supported_one() -> None:
    with pytest.raises(UnsupportedArchitectureError) as info:
        parse_hf_config(raw("GPT2LMHeadModel"), source="gpt2/config.json")
    assert str(info.value) == (
        "gpt2/config.json: architecture 'GPT2LMHeadModel' is not supported; supported: "
        "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
        "Gemma2ForCausalLM, Gemma3ForCausalLM, Phi3ForCausalLM, MixtralForCausalLM, "
        "Qwen3MoeForCausalLM"
    )


def test_activations_the_decoder_lacks_are_refused() -> None:
    with pytest.raises(
        CheckpointError, match="activation 'relu2' is not supported; supported: silu"
    ):
        parse_hf_config(raw("LlamaForCausalLM", hidden_act="relu2"))
    assert parse_hf_config(raw("MistralForCausalLM", hidden_act="gelu")).hidden_act == "gelu"


def test_every_named_activation_exists() -> None:
    from muxserve.models.decoder import ACTIVATIONS as IMPLEMENTED
    from muxserve.models.family_config import ACTIVATIONS

    assert tuple(IMPLEMENTED) == ACTIVATIONS


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rope_theta": -10000.0}, "key 'rope_theta' must be a positive number, got -10000.0"),
        ({"rope_theta": 0}, "key 'rope_theta' must be a positive number, got 0.0"),
        (
            {"rope_scaling": {"rope_type": "linear", "factor": -2.0}},
            "key 'rope_scaling.factor' must be a positive number, got -2.0",
        ),
        (
            {"rope_scaling": {"rope_type": "dynamic", "factor": 0}},
            "key 'rope_scaling.factor' must be a positive number, got 0",
        ),
        (
            {"eos_token_id": 10**20},
            "key 'eos_token_id' holds 100000000000000000000, not a token id in [0, 10)",
        ),
        ({"eos_token_id": 10}, "key 'eos_token_id' holds 10, not a token id in [0, 10)"),
        ({"eos_token_id": [2, -1]}, "key 'eos_token_id' holds -1, not a token id in [0, 10)"),
    ],
    ids=[
        "negative-theta",
        "zero-theta",
        "negative-factor",
        "zero-factor",
        "eos-1e20",
        "eos-vocab",
        "eos-negative",
    ],
)
def test_implausible_values_are_refused_naming_the_key(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(CheckpointError) as info:
        parse_hf_config(raw("LlamaForCausalLM", **fields), source="m/config.json")
    assert str(info.value) == f"m/config.json: {message}"


def test_plausible_values_pass() -> None:
    config = parse_hf_config(
        raw(
            "LlamaForCausalLM",
            rope_theta=500000.0,
            rope_scaling={"rope_type": "linear", "factor": 0.5},  # compression is allowed
            eos_token_id=[0, 9],
        )
    )
    assert (config.rope_theta, config.eos_token_ids) == (500000.0, (0, 9))
