"""hf_config reads the fields our model needs the way transformers' own model classes do."""

from __future__ import annotations

from typing import Any

import pytest

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
