"""One of every family served together from one engine and one KV pool: greedy tokens equal
transformers' `generate`, offline and as text over the OpenAI-compatible HTTP server.

The zoo (Qwen3, Gemma 2, Gemma 3, Phi-3, Mixtral, Qwen3-MoE) and the demo models (Llama,
Qwen2, Mistral) share a pool whose blocks each model views with its own head size; their jobs
interleave. Prompt and continuation stay within Phi-3's original 32 positions: past them HF's
generate re-prefills the sequence with the long RoPE factors, which we do not (see
muxserve/models/rope.py; tests/models/test_families.py checks the long factors themselves).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer

from muxserve.client.in_process import InProcessClient
from muxserve.config import parse_config
from muxserve.engine import MuxEngine
from muxserve.sampling_params import SamplingParams
from muxserve.server import create_app
from muxserve.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

PROMPT_LENGTHS = (3, 9, 15)  # 15 + 16 new tokens: 30 positions
MAX_NEW = 16


def prompts_for(model: str) -> list[list[int]]:
    rng = random.Random(model)
    return [[rng.randrange(7, 1000) for _ in range(n)] for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def every_family(zoo_models: dict[str, Path], demo_models: dict[str, Path]) -> dict[str, Path]:
    return {**zoo_models, **demo_models}


@pytest.fixture(scope="module")
def engine(every_family: dict[str, Path]) -> Iterator[MuxEngine]:
    config = parse_config(
        {
            "models": [{"name": n, "path": str(p)} for n, p in every_family.items()],
            "engine": {"kv_pool_bytes": 8 << 20, "block_bytes": 4096, "prefill_token_budget": 64},
        }
    )
    eng = MuxEngine(config)
    eng.start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def hf_greedy(every_family: dict[str, Path]) -> dict[str, list[list[int]]]:
    out = {}
    for name, folder in every_family.items():
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        rows = []
        for p in prompts_for(name):
            ids = hf.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False)
            rows.append(ids[0, len(p) :].tolist())
        out[name] = rows
    return out


def test_one_pool_serves_every_family(
    engine: MuxEngine, hf_greedy: dict[str, list[list[int]]]
) -> None:
    names = list(hf_greedy)
    pairs = [(m, p) for m in names for p in prompts_for(m)]
    random.Random(0).shuffle(pairs)  # interleaved: every family's jobs share the pool at once
    outs = engine.generate(
        [p for _, p in pairs],
        SamplingParams(max_tokens=MAX_NEW, temperature=0.0),
        [m for m, _ in pairs],
    )
    got: dict[str, dict[tuple[int, ...], list[int]]] = {m: {} for m in names}
    for (m, p), c in zip(pairs, outs, strict=True):
        got[m][tuple(p)] = c.token_ids
    for m in names:
        assert [got[m][tuple(p)] for p in prompts_for(m)] == hf_greedy[m], m
    assert sorted(engine.models) == sorted(names)
    engine.check_integrity()
    assert engine.scheduler.pool.num_free == engine.scheduler.pool.num_blocks


def test_greedy_text_over_http_equals_hf(
    engine: MuxEngine, every_family: dict[str, Path], hf_greedy: dict[str, list[list[int]]]
) -> None:
    names = list(every_family)

    async def main() -> list[dict[str, Any]]:
        app = create_app(InProcessClient(engine, manage=False))
        async with TestClient(TestServer(app)) as client:

            async def one(name: str) -> dict[str, Any]:
                body = {
                    "model": name,
                    "prompt": prompts_for(name)[2],
                    "max_tokens": MAX_NEW,
                    "temperature": 0,
                }
                r = await client.post("/v1/completions", json=body)
                assert r.status == 200, await r.text()
                data: dict[str, Any] = await r.json()
                return data

            return await asyncio.gather(*(one(n) for n in names))

    for name, data in zip(names, asyncio.run(main()), strict=True):
        expected = Tokenizer.from_pretrained(every_family[name]).decode(hf_greedy[name][2])
        assert data["choices"][0]["text"] == expected, name
        assert data["usage"]["completion_tokens"] == len(hf_greedy[name][2])
