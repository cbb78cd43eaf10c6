"""Every registered family against transformers' own forward on tiny random checkpoints:
Qwen3, Gemma 2, Gemma 3 text, Phi-3, Mixtral, Qwen3-MoE (Llama, Mistral, Qwen2: test_llama).

Logits in float32 over packed sequences at different offsets (max abs diff <= 1e-4), the
checkpoint's tensor names and shapes as the registry predicts them, and the parameter counts
the planner uses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from muxserve.models.decoder import parameter_shapes
from muxserve.models.dense_attention import DenseAttention
from muxserve.models.hf_config import HFModelConfig, load_hf_config
from muxserve.models.loader import load_model, read_safetensors_header
from muxserve.models.registry import build_model, checkpoint_shapes

MakeFamily = Callable[..., Path]

VOCAB = 96  # conftest.VOCAB
FP32_TOL = 1e-4

# case -> (zoo family, config overrides); the zoo's own config plus what it leaves untested
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3": ("qwen3-zoo", {}),
    "qwen3-bias-tied-window": (
        "qwen3-zoo",
        {
            "attention_bias": True,
            "tie_word_embeddings": True,
            "use_sliding_window": True,
            "sliding_window": 4,
            "max_window_layers": 1,
        },
    ),
    "gemma2": ("gemma2-zoo", {}),
    "gemma2-no-caps-untied": (
        "gemma2-zoo",
        {
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
            "query_pre_attn_scalar": 16,
            "tie_word_embeddings": False,
        },
    ),
    "gemma2-tight-caps": (  # caps small enough to bend the scores and logits a lot
        "gemma2-zoo",
        {"attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0},
    ),
    "gemma3": ("gemma3-zoo", {}),
    "gemma3-default-rope-softcap": (
        "gemma3-zoo",
        {
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e3},
            },
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 4.0,
        },
    ),
    "phi3-longrope-partial": ("phi3-zoo", {}),
    "phi3-plain": ("phi3-zoo", {"rope_scaling": None, "partial_rotary_factor": 1.0}),
    "mixtral": ("mixtral-zoo", {}),
    "mixtral-top1-window": (
        "mixtral-zoo",
        {"num_local_experts": 3, "num_experts_per_tok": 1, "sliding_window": 6},
    ),
    "qwen3-moe": ("qwen3-moe-zoo", {}),
    "qwen3-moe-sparse-step-unnormed": (
        "qwen3-moe-zoo",
        {"decoder_sparse_step": 2, "mlp_only_layers": [], "norm_topk_prob": False},
    ),
}


def packed(offsets: Sequence[int], lengths: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (sum(lengths),), generator=torch.Generator().manual_seed(5))
    pos = torch.cat([torch.arange(o, o + n) for o, n in zip(offsets, lengths, strict=True)])
    return ids, pos


def our_logits(
    folder: Path, ids: torch.Tensor, positions: torch.Tensor, lengths: Sequence[int]
) -> tuple[torch.Tensor, HFModelConfig]:
    model, config = load_model(folder, torch.float32, torch.device("cpu"))
    attention = DenseAttention(lengths, config.layer_sliding_windows, config.attn_logit_softcap)
    with torch.no_grad():
        return model.compute_logits(model(ids, positions, attention)), config


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf_float32(
    case: str, make_family: MakeFamily, hf_logits: Callable[..., torch.Tensor]
) -> None:
    """Three sequences packed in one call, at offsets 0, 3 and 11; 18 tokens reach past every
    window; all positions stay within Phi-3's original 32 (see test_phi3_past_original_length)."""
    family, overrides = CASES[case]
    folder = make_family(family, **overrides)
    offsets, lengths = [0, 3, 11], [18, 7, 12]
    ids, positions = packed(offsets, lengths)
    ours, _ = our_logits(folder, ids, positions, lengths)
    ref = hf_logits(folder, ids, offsets, lengths)
    assert ours.dtype == torch.float32 and ours.shape == (sum(lengths), VOCAB)
    assert (ours - ref).abs().max().item() <= FP32_TOL
    assert ref.abs().max().item() > 1.0  # logits of a few units: the tolerance means something


def test_phi3_past_original_length(make_family: MakeFamily) -> None:
    """Past `original_max_position_embeddings` (32) a token rotates with the long factors.

    HF picks one set per call from the call's longest position; we pick per token. So HF run
    as a decode loop — a prompt within 32 tokens, then one token per call — is matched row by
    row by a single call of ours over the whole sequence. (HF's `generate` also re-prefills the
    sequence when it first passes 32, which we do not: see muxserve/models/rope.py.)
    """
    import transformers

    folder = make_family("phi3-zoo")
    model, config = load_model(folder, torch.float32, torch.device("cpu"))
    n, prompt = 46, 30
    ids = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        attention = DenseAttention([n], config.layer_sliding_windows)
        ours = model.compute_logits(model(ids, torch.arange(n), attention))  # (n, vocab)
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        out = hf(ids[None, :prompt], use_cache=True)
        rows, cache = [out.logits[0]], out.cache
        for i in range(prompt, n):  # one decode step per token, as generate runs
            out = hf(ids[None, i : i + 1], cache=cache, use_cache=True)
            rows.append(out.logits[0])
            cache = out.cache
    ref = torch.cat(rows).float()
    assert (ours - ref).abs().max().item() <= FP32_TOL
    long_rope = model.model.rotary_emb  # and there were two sets of factors to pick from

    assert long_rope.long_from == 32 and long_rope.long_inv_freq is not None
    assert not torch.equal(long_rope.long_inv_freq, long_rope.inv_freq)


@pytest.mark.parametrize("case", ["qwen3", "gemma2", "gemma3", "phi3-longrope-partial", "mixtral"])
def test_half_precision_stays_close_to_hf(
    case: str, make_family: MakeFamily, hf_logits: Callable[..., torch.Tensor]
) -> None:
    family, overrides = CASES[case]
    folder = make_family(family, **overrides)
    model, _ = load_model(folder, torch.bfloat16, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids, positions = packed([0], [20])
    attention = DenseAttention(
        [20], model.config.layer_sliding_windows, model.config.attn_logit_softcap
    )
    with torch.no_grad():
        ours = model.compute_logits(model(ids, positions, attention))
    ref = hf_logits(folder, ids, [0], [20], torch.bfloat16)
    assert (ours - ref).abs().max().item() < 0.1


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_tensors_are_what_the_registry_predicts(
    case: str, make_family: MakeFamily
) -> None:
    """Names and shapes of the saved file == `checkpoint_shapes`; the model's parameters ==
    `parameter_shapes`; the planner's parameter count == transformers' own."""
    family, overrides = CASES[case]
    folder = make_family(family, **overrides)
    config = load_hf_config(folder)
    on_disk = {n: i.shape for n, i in read_safetensors_header(folder / "model.safetensors").items()}
    assert checkpoint_shapes(config) == on_disk
    with torch.device("meta"):
        model = build_model(config)
    assert parameter_shapes(config) == {n: tuple(p.shape) for n, p in model.named_parameters()}
    hf_count = sum(t.numel() for t in load_file(folder / "model.safetensors").values())
    assert config.num_params() == hf_count


def test_every_weight_lands_where_it_belongs(make_family: MakeFamily) -> None:
    """Fused (Phi-3) and per-expert (Mixtral) tensors are split and stacked exactly."""
    phi = make_family("phi3-zoo")
    tensors = load_file(phi / "model.safetensors")
    model, _ = load_model(phi, torch.float32, "cpu")
    qkv = tensors["model.layers.1.self_attn.qkv_proj.weight"]
    attn = model.model.layers[1].self_attn
    assert torch.equal(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), qkv)
    gate_up = tensors["model.layers.0.mlp.gate_up_proj.weight"]
    mlp = model.model.layers[0].mlp
    assert torch.equal(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), gate_up)

    mix = make_family("mixtral-zoo")
    tensors = load_file(mix / "model.safetensors")
    model, _ = load_model(mix, torch.float32, "cpu")
    experts = model.model.layers[1].mlp.experts
    for e in range(4):
        prefix = f"model.layers.1.block_sparse_moe.experts.{e}."
        assert torch.equal(experts.gate_proj[e], tensors[prefix + "w1.weight"])
        assert torch.equal(experts.up_proj[e], tensors[prefix + "w3.weight"])
        assert torch.equal(experts.down_proj[e], tensors[prefix + "w2.weight"])
    assert torch.equal(
        model.model.layers[1].mlp.gate.weight,
        tensors["model.layers.1.block_sparse_moe.gate.weight"],
    )
