"""Tensor parallelism 2 over gloo for the newer families: Qwen3 (q/k norms per head) and
Mixtral (every expert on every rank, each with half of its inner width), served by the mps
executor with greedy tokens equal to transformers' generate; the shards themselves exactly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from muxserve.config import parse_config
from muxserve.engine import MuxEngine
from muxserve.models.loader import load_model
from muxserve.models.sharding import shard_model
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.job import Phase

transformers = pytest.importorskip("transformers")

TP_MODELS = ["qwen3-zoo", "mixtral-zoo"]
PROMPTS = [[11, 12, 13], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [700, 3, 901, 77] * 5]
MAX_NEW = 12
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def engine(zoo_models: dict[str, Path]) -> Iterator[MuxEngine]:
    models = [
        {
            "name": n,
            "path": str(zoo_models[n]),
            "tensor_parallel": 2,
            "sm_share": {"prefill": 0.5, "decode": 0.5},
        }
        for n in TP_MODELS
    ]
    engine = {"kv_pool_bytes": 4 << 20, "block_bytes": 4096, "executor": "mps"}
    eng = MuxEngine(parse_config({"models": models, "engine": engine}))
    yield eng
    eng.shutdown()


def hf_generate(folder: Path) -> list[list[int]]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    rows = []
    for p in PROMPTS:
        ids = hf.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False)
        rows.append(ids[0, len(p) :].tolist())
    return rows


def test_two_ranks_per_model_and_phase(engine: MuxEngine) -> None:
    pids = engine.executor.worker_pids()
    assert {k: len(v) for k, v in pids.items()} == {(m, p): 2 for m in TP_MODELS for p in Phase}


@pytest.mark.parametrize("model", TP_MODELS)
def test_greedy_at_tp2_matches_hf_generate(
    model: str, engine: MuxEngine, zoo_models: dict[str, Path]
) -> None:
    greedy = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    outs = engine.generate(PROMPTS, greedy, model)
    assert [c.token_ids for c in outs] == hf_generate(zoo_models[model])
    engine.check_integrity()
    assert engine.scheduler.pool.num_free == engine.scheduler.pool.num_blocks


def test_experts_shard_by_width_and_routers_stay_whole(zoo_models: dict[str, Path]) -> None:
    whole, config = load_model(zoo_models["mixtral-zoo"], torch.float32, CPU)
    shards = [shard_model(whole, r, 2, CPU) for r in range(2)]
    full = dict(whole.named_parameters())
    parts = [dict(s.named_parameters()) for s in shards]
    e, i, h = config.num_experts, config.moe_intermediate_size, config.hidden_size
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}.mlp."
        for name, dim, shape in (
            ("experts.gate_proj", 1, (e, i // 2, h)),
            ("experts.up_proj", 1, (e, i // 2, h)),
            ("experts.down_proj", 2, (e, h, i // 2)),
        ):
            halves = [p[prefix + name] for p in parts]
            assert all(tuple(t.shape) == shape for t in halves)
            assert torch.equal(torch.cat(halves, dim=dim), full[prefix + name])
        assert all(
            torch.equal(p[prefix + "gate.weight"], full[prefix + "gate.weight"]) for p in parts
        )


def test_qwen3_shards_keep_whole_qk_norms(zoo_models: dict[str, Path]) -> None:
    whole, _ = load_model(zoo_models["qwen3-zoo"], torch.float32, CPU)
    shard = shard_model(whole, 1, 2, CPU)
    attn, full = shard.model.layers[0].self_attn, whole.model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
    assert attn.q_norm is not None and full.q_norm is not None
    assert torch.equal(attn.q_norm.weight, full.q_norm.weight)  # per head: every rank, whole
