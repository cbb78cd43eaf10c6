"""The engine tests' config, prompts and references, shared by the in-process, mps and
tensor-parallel engine tests (tests/test_engine.py, tests/executor/, tests/parallel/)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
from pathlib import Path

import pytest
import torch

from muxserve.config import MuxConfig, default_cache_dir, parse_config
from muxserve.engine import MuxEngine
from muxserve.sampling_params import SamplingParams

PROMPT_LENGTHS = (1, 2, 5, 9, 17, 40, 75, 130)  # mixed; 130 > the prefill budget below
MAX_NEW = 20
# all prompts of all models need 576 blocks of 4 KiB at once; the largest single request 80
TIGHT_POOL = 200 * 4096
GREEDY = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)


def make_config(demo_models: dict[str, Path], **engine: object) -> MuxConfig:
    defaults: dict[str, object] = {"kv_pool_bytes": 4 << 20, "block_bytes": 4096}
    defaults["prefill_token_budget"] = 64
    return parse_config(
        {
            "models": [
                {"name": n, "path": str(p), "rate": r}
                for (n, p), r in zip(demo_models.items(), (3.0, 2.0, 1.0), strict=True)
            ],
            "engine": defaults | engine,
        }
    )


def prompts_for(model: str, vocab: int = 900) -> list[list[int]]:
    rng = random.Random(model)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in PROMPT_LENGTHS]


def run_all(engine: MuxEngine, params: SamplingParams) -> dict[str, list[list[int]]]:
    """Every model's prompts, submitted together so their jobs interleave."""
    names = list(engine.models)
    pairs = [(m, p) for m in names for p in prompts_for(m)]
    random.Random(1).shuffle(pairs)
    outs = engine.generate([p for _, p in pairs], params, [m for m, _ in pairs])
    by_model: dict[str, dict[tuple[int, ...], list[int]]] = {m: {} for m in names}
    for (m, p), c in zip(pairs, outs, strict=True):
        by_model[m][tuple(p)] = c.token_ids
    return {m: [by_model[m][tuple(p)] for p in prompts_for(m)] for m in names}


REFERENCE_ENV = "MUXSERVE_TEST_REFERENCES"  # off: recompute transformers' outputs every session


@functools.cache
def hf_greedy(name: str, path: Path) -> tuple[tuple[int, ...], ...]:
    """HF `generate` (eager attention, float32) on `prompts_for(name)`, `MAX_NEW` tokens each.

    The engine, mps and tensor-parallel tests all compare against it, and each model costs
    seconds to run: computed once per session, and kept on disk under the key of everything it
    depends on (the checkpoint's bytes, the prompts, transformers' and torch's versions), so a
    later session reads it unless one of them changed.
    """
    transformers = pytest.importorskip("transformers")
    prompts = prompts_for(name)
    key = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        if f.is_file():
            key.update(f.name.encode() + f.read_bytes())
    key.update(json.dumps([prompts, MAX_NEW, transformers.__version__, torch.__version__]).encode())
    cache = default_cache_dir() / "test-references" / f"hf-greedy-{key.hexdigest()[:32]}.json"
    if os.environ.get(REFERENCE_ENV, "on") != "off" and cache.is_file():
        return tuple(tuple(row) for row in json.loads(cache.read_text()))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )
    rows = []
    for p in prompts:
        ids = hf.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False)
        rows.append(tuple(ids[0, len(p) :].tolist()))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rows))
    tmp.replace(cache)  # whole or not at all: sessions may run side by side
    return tuple(rows)
