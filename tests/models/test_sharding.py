"""Sharding a model for tensor parallelism: which slice of each tensor a rank holds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from muxserve.models.hf_config import check_divisible
from muxserve.models.loader import load_model
from muxserve.models.sharding import rank_device, shard_model
from muxserve.parallel.layers import ColumnParallelLinear, RowParallelLinear

CPU = torch.device("cpu")
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # split by output rows
ROW = ("o_proj", "down_proj")  # split by input columns


@pytest.fixture(scope="module")
def llama(demo_models: dict[str, Path]):
    return load_model(demo_models["llama-demo"], torch.float32, CPU)[0]


def test_shards_put_back_together_are_the_whole_model(llama):
    shards = [shard_model(llama, r, 2, CPU) for r in range(2)]
    whole = dict(llama.named_parameters())
    parts = [dict(s.named_parameters()) for s in shards]
    assert set(parts[0]) == set(whole)  # HF names, so the loader fills them by name
    for name, tensor in whole.items():
        halves = [p[name] for p in parts]
        if any(f".{c}." in name for c in COLUMN) or name == "lm_head.weight":
            torch.testing.assert_close(torch.cat(halves, dim=0), tensor, rtol=0, atol=0)
            assert halves[0].shape[0] == tensor.shape[0] // 2
        elif any(f".{r}.weight" in name for r in ROW):
            torch.testing.assert_close(torch.cat(halves, dim=1), tensor, rtol=0, atol=0)
        else:  # embeddings and norms: every rank holds all of it
            assert all(torch.equal(h, tensor) for h in halves)


def test_a_shard_has_half_the_heads(llama):
    shard = shard_model(llama, 1, 2, CPU)
    attn = shard.model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads) == (2, 2)
    assert isinstance(attn.q_proj, ColumnParallelLinear)
    assert isinstance(attn.o_proj, RowParallelLinear)
    assert shard.vocab_parallel and shard.lm_head is not None
    assert shard.lm_head.weight.shape == (llama.config.vocab_size // 2, llama.config.hidden_size)


def test_models_that_do_not_divide_are_refused(demo_models):
    mistral = load_model(demo_models["mistral-demo"], torch.float32, CPU)[1]
    with pytest.raises(
        ValueError, match=r"tensor_parallel=2 must divide the model's KV heads \(1\)"
    ):
        check_divisible(mistral, 2)
    check_divisible(mistral, 1)


def test_rank_devices():
    assert rank_device(CPU, 1) == CPU
    assert rank_device(torch.device("cuda", 2), 1) == torch.device("cuda", 3)
    assert rank_device(torch.device("cuda"), 0) == torch.device("cuda", 0)
