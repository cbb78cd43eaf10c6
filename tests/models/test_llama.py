"""Our Llama/Qwen2/Mistral against transformers' own forward on tiny random checkpoints."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from muxserve.models.dense_attention import DenseAttention
from muxserve.models.llama import LlamaForCausalLM
from muxserve.models.loader import load_model

MakeCheckpoint = Callable[..., Path]

VOCAB = 96  # conftest.BASE's vocab_size
FP32_TOL = 1e-4


def our_logits(
    folder: Path,
    ids: torch.Tensor,
    positions: torch.Tensor,
    lengths: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    model, config = load_model(folder, dtype, torch.device("cpu"))
    attention = DenseAttention(lengths, config.layer_sliding_windows)
    with torch.no_grad():
        return model.compute_logits(model(ids, positions, attention))


def random_ids(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-mha": ("llama", {}),
    "llama-gqa": ("llama", {"num_key_value_heads": 2}),
    "llama-mqa-tied": ("llama", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    "llama-head-dim": ("llama", {"head_dim": 16, "num_key_value_heads": 2}),
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "qwen2-qkv-bias-tied": ("qwen2", {}),
    "qwen2-untied": ("qwen2", {"tie_word_embeddings": False}),
    "qwen2-window-upper-layers": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    ),
    "mistral-window-4": ("mistral", {}),
    "mistral-no-window": ("mistral", {"sliding_window": None, "head_dim": 16}),
    "rope-linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "rope-llama3": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
            },
            "rope_theta": 500000.0,
        },
    ),
    "rope-yarn": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 8,
            }
        },
    ),
    "rope-yarn-mscale": (
        "qwen2",
        {
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 8,
                "mscale": 0.707,
                "mscale_all_dim": 1.0,
                "beta_fast": 16,
            }
        },
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_hf_float32(
    case: str, make_checkpoint: MakeCheckpoint, hf_logits: Callable[..., torch.Tensor]
) -> None:
    family, overrides = CASES[case]
    folder = make_checkpoint(family, **overrides)
    ids, n = random_ids(20), 20
    ours = our_logits(folder, ids, torch.arange(n), [n])
    ref = hf_logits(folder, ids, [0], [n])
    assert ours.dtype == torch.float32 and ours.shape == (n, VOCAB)
    assert (ours - ref).abs().max().item() < FP32_TOL


def test_packed_sequences_at_different_offsets(
    make_checkpoint: MakeCheckpoint,
    hf_logits: Callable[..., torch.Tensor],
    packed_positions: Callable[..., torch.Tensor],
) -> None:
    """Three sequences in one call; one starts past max_position_embeddings (the table grows)."""
    folder = make_checkpoint("llama", num_key_value_heads=2)
    offsets, lengths = [0, 7, 40], [9, 5, 6]
    ids = random_ids(sum(lengths), seed=2)
    ours = our_logits(folder, ids, packed_positions(offsets, lengths), lengths)
    ref = hf_logits(folder, ids, offsets, lengths)
    assert (ours - ref).abs().max().item() < FP32_TOL


def test_sliding_window_over_packed_sequences(
    make_checkpoint: MakeCheckpoint,
    hf_logits: Callable[..., torch.Tensor],
    packed_positions: Callable[..., torch.Tensor],
) -> None:
    folder = make_checkpoint("mistral")
    offsets, lengths = [0, 3], [17, 12]
    ids = random_ids(sum(lengths), seed=3)
    ours = our_logits(folder, ids, packed_positions(offsets, lengths), lengths)
    ref = hf_logits(folder, ids, offsets, lengths)
    assert (ours - ref).abs().max().item() < FP32_TOL


def test_window_is_not_vacuous(
    make_checkpoint: MakeCheckpoint, hf_logits: Callable[..., torch.Tensor]
) -> None:
    """Ignoring Mistral's window would be caught: the comparisons above can fail."""
    folder = make_checkpoint("mistral")
    model, config = load_model(folder, torch.float32, "cpu")
    ids, n = random_ids(20), 20
    with torch.no_grad():
        hidden = model(ids, torch.arange(n), DenseAttention([n], [None] * config.num_layers))
    ref = hf_logits(folder, ids, [0], [n])
    assert (model.compute_logits(hidden) - ref).abs().max().item() > 1e-2


def test_dynamic_rope_beyond_max_positions(
    make_checkpoint: MakeCheckpoint,
    hf_logits: Callable[..., torch.Tensor],
) -> None:
    """Past max_position_embeddings (32) the base is re-stretched for the longest position."""
    folder = make_checkpoint("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    for n in (20, 45):  # within, then beyond: the second must not reuse the first's table
        ids = random_ids(n, seed=n)
        ours = our_logits(folder, ids, torch.arange(n), [n])
        ref = hf_logits(folder, ids, [0], [n])
        assert (ours - ref).abs().max().item() < FP32_TOL


def test_sharded_checkpoint(
    make_checkpoint: MakeCheckpoint, hf_logits: Callable[..., torch.Tensor]
) -> None:
    folder = make_checkpoint("qwen2", max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    ids, n = random_ids(16), 16
    ours = our_logits(folder, ids, torch.arange(n), [n])
    assert (ours - hf_logits(folder, ids, [0], [n])).abs().max().item() < FP32_TOL


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)], ids=["bf16", "fp16"]
)
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_half_precision_matches_hf_in_same_dtype(
    family: str,
    dtype: torch.dtype,
    tol: float,
    make_checkpoint: MakeCheckpoint,
    hf_logits: Callable[..., torch.Tensor],
) -> None:
    folder = make_checkpoint(family)
    model, _ = load_model(folder, dtype, "cpu")
    assert {p.dtype for p in model.parameters()} == {dtype}
    rope = model.model.rotary_emb
    assert rope.inv_freq.dtype == torch.float32  # angles stay float32, as in HF

    ids, n = random_ids(20), 20
    ours = our_logits(folder, ids, torch.arange(n), [n], dtype)
    ref = hf_logits(folder, ids, [0], [n], dtype)
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() < tol


def test_model_is_inference_only(make_checkpoint: MakeCheckpoint) -> None:
    model, config = load_model(
        make_checkpoint("llama", tie_word_embeddings=True), torch.float32, "cpu"
    )
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.lm_head is None  # tied: the head is the embedding, not a copy
    names = {name for name, _ in model.named_parameters()}
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert config.tie_word_embeddings


def test_forward_takes_flat_tokens_and_returns_normed_hidden(
    make_checkpoint: MakeCheckpoint,
) -> None:
    model, config = load_model(make_checkpoint("llama"), torch.float32, "cpu")
    ids = random_ids(5)
    hidden = model(ids, torch.arange(5), DenseAttention([5], config.layer_sliding_windows))
    assert hidden.shape == (5, config.hidden_size)
    # a token's hidden state depends only on itself and earlier tokens of its own sequence
    first = model(ids[:3], torch.arange(3), DenseAttention([3], config.layer_sliding_windows))
    assert torch.allclose(hidden[:3], first, atol=1e-6)
