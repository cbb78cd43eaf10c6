"""RoPE frequencies and tables against transformers' own rope functions, value for value."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from muxserve.models.hf_config import HFModelConfig, parse_hf_config
from muxserve.models.llama import LlamaForCausalLM
from muxserve.models.rope import RotaryEmbedding, rope_parameters

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

CPU = torch.device("cpu")

SCALINGS: dict[str, dict[str, Any] | None] = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    "yarn-mscale": {
        "rope_type": "yarn",
        "factor": 40.0,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
        "beta_fast": 16,
        "beta_slow": 2,
        "original_max_position_embeddings": 4096,
    },
    "yarn-attention-factor-no-truncate": {
        "rope_type": "yarn",
        "factor": 2.0,
        "attention_factor": 0.9,
        "truncate": False,
    },
}


def configs(scaling: dict[str, Any] | None) -> tuple[Any, HFModelConfig]:
    """The same architecture as transformers' LlamaConfig and as our HFModelConfig."""
    hf = transformers.LlamaConfig(
        hidden_size=512,
        num_attention_heads=4,
        head_dim=96,  # explicit and != 512 / 4, so both sides must read it
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=dict(scaling) if scaling else None,
    )
    raw = {**hf.to_dict(), "architectures": ["LlamaForCausalLM"]}
    return hf, parse_hf_config(raw)


def hf_parameters(hf: Any, seq_len: Any = None) -> tuple[torch.Tensor, float]:
    rope_type = hf.rope_parameters["rope_type"]
    if rope_type == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    return ROPE_INIT_FUNCTIONS[rope_type](hf, None, seq_len=seq_len)


@pytest.mark.parametrize("name", list(SCALINGS))
def test_inv_freq_and_scale_equal_hf(name: str) -> None:
    hf, ours = configs(SCALINGS[name])
    inv_freq, scale = rope_parameters(ours, CPU)
    hf_inv_freq, hf_scale = hf_parameters(hf)
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (48,)
    assert torch.equal(inv_freq, hf_inv_freq)
    assert scale == pytest.approx(hf_scale, rel=0, abs=0)


@pytest.mark.parametrize("longest", [131072, 131073, 200000])
def test_dynamic_stretches_for_the_longest_position(longest: int) -> None:
    hf, ours = configs(SCALINGS["dynamic"])
    seq_len = torch.tensor(longest)  # HF's forward passes max(position_ids) + 1, a tensor
    assert torch.equal(rope_parameters(ours, CPU, seq_len)[0], hf_parameters(hf, seq_len)[0])


def test_dynamic_table_uses_the_stretched_base_only_past_max_positions() -> None:
    _, ours = configs(SCALINGS["dynamic"])
    rope = RotaryEmbedding(ours)
    short = torch.tensor([0, 5, 131071])
    cos_short, _ = rope(short, torch.float32)
    far = torch.tensor([0, 5, 200000])
    cos_far, _ = rope(far, torch.float32)
    assert not torch.equal(cos_short[1], cos_far[1])  # same position, another base
    stretched, _ = rope_parameters(ours, CPU, torch.tensor(200001))
    assert torch.equal(cos_far[1, :48], (5.0 * stretched).cos())


def test_table_grows_and_matches_direct_computation() -> None:
    hf, _ = configs(SCALINGS["yarn"])
    small = parse_hf_config(
        {**hf.to_dict(), "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 16}
    )
    rope = RotaryEmbedding(small)
    positions = torch.tensor([3, 40, 15, 0])
    cos, sin = rope(positions, torch.float32)
    assert rope._table is not None and rope._table[0].shape[0] >= 41
    inv_freq, scale = rope_parameters(small, CPU)
    freqs = positions.float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd), HF's layout
    assert torch.equal(cos, emb.cos() * scale) and torch.equal(sin, emb.sin() * scale)
    cos_half, _ = rope(positions, torch.bfloat16)
    assert cos_half.dtype == torch.bfloat16 and torch.equal(cos_half, cos.to(torch.bfloat16))


def test_the_table_holds_the_served_context_not_max_position_embeddings() -> None:
    """A config.json may claim 10^8 positions (a table of ~40 GB here): 256 are served."""
    hf, _ = configs(SCALINGS["linear"])
    huge = parse_hf_config(
        {**hf.to_dict(), "architectures": ["LlamaForCausalLM"], "max_position_embeddings": 10**8}
    )
    rope = RotaryEmbedding(huge)
    rope.build_cache(CPU, 256)
    assert rope.table_positions == 256
    positions = torch.tensor([0, 255, 17])
    cos, sin = rope(positions, torch.float32)
    inv_freq, scale = rope_parameters(huge, CPU)
    freqs = positions.float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd), HF's layout
    assert torch.equal(cos, emb.cos() * scale) and torch.equal(sin, emb.sin() * scale)
    assert rope.table_positions == 256  # nothing past it was asked for


def test_model_built_on_meta_keeps_float32_rope_on_cpu() -> None:
    _, ours = configs(SCALINGS["llama3"])
    with torch.device("meta"):
        model = LlamaForCausalLM(ours)
    model = model.to(torch.bfloat16)
    rope = model.model.rotary_emb
    assert rope.inv_freq.device == CPU and rope.inv_freq.dtype == torch.float32
    assert torch.equal(rope.inv_freq, rope_parameters(ours, CPU)[0])


def test_transformers4_style_config_gives_the_same_frequencies() -> None:
    hf, _ = configs(SCALINGS["llama3"])
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 10,
        "hidden_size": 512,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "head_dim": 96,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        # the old spelling: "type" instead of "rope_type", theta outside
        "rope_scaling": {
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    assert torch.equal(rope_parameters(parse_hf_config(raw), CPU)[0], hf_parameters(hf)[0])
