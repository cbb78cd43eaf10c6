"""Routed experts: the grouped GEMMs, their per-expert fallback, and a reference per token."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from muxserve.models import experts as experts_module
from muxserve.models.experts import SparseMoeBlock, grouped_linear
from muxserve.models.hf_config import parse_hf_config

CONFIG = parse_hf_config(
    {
        "architectures": ["MixtralForCausalLM"],
        "vocab_size": 16,
        "hidden_size": 8,
        "intermediate_size": 12,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_local_experts": 5,
        "num_experts_per_tok": 2,
    }
)


def block(norm: bool = True) -> SparseMoeBlock:
    torch.manual_seed(0)
    moe = SparseMoeBlock(dataclasses.replace(CONFIG, norm_topk_prob=norm))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return moe


def per_token_reference(moe: SparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """The definition, one token and one chosen expert at a time."""
    probs = torch.softmax(moe.gate(x).float(), dim=-1)
    weights, idx = torch.topk(probs, moe.top_k, dim=-1)
    if moe.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    e = moe.experts
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(moe.top_k):
            k = int(idx[t, j])
            h = F.silu(e.gate_proj[k] @ x[t]) * (e.up_proj[k] @ x[t])
            out[t] += weights[t, j] * (e.down_proj[k] @ h)
    return out


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_grouped_experts_match_the_definition(norm: bool, tokens: int) -> None:
    moe = block(norm)
    x = torch.randn(tokens, 8, generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        torch.testing.assert_close(moe(x), per_token_reference(moe, x), rtol=0, atol=1e-5)


def test_the_fallback_loop_over_experts_gives_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where grouped_mm is missing (older torch) or refuses a dtype, one GEMM per expert hit."""
    moe = block()
    x = torch.randn(17, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        grouped = moe(x)
        monkeypatch.setattr(experts_module.F, "grouped_mm", None, raising=False)
        assert torch.equal(moe(x), grouped)


def test_grouped_linear_with_idle_experts() -> None:
    x = torch.randn(6, 8)
    w = torch.randn(4, 3, 8)
    counts = torch.tensor([2, 0, 4, 0])
    out = grouped_linear(x, w, counts)
    torch.testing.assert_close(out, torch.cat([x[:2] @ w[0].T, x[2:] @ w[2].T]), rtol=0, atol=0)
