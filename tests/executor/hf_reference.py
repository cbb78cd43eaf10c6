"""Transformers' greedy continuations of the engine tests' prompts, computed once per session."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from test_engine import MAX_NEW, prompts_for


@functools.cache
def hf_greedy(name: str, path: Path) -> tuple[tuple[int, ...], ...]:
    """HF `generate` (eager attention, float32) on `prompts_for(name)`, `MAX_NEW` tokens each.

    Cached for the session: the executor and the tensor-parallel tests compare against the same
    reference, and each model costs seconds to run.
    """
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )
    rows = []
    for p in prompts_for(name):
        ids = hf.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False)
        rows.append(tuple(ids[0, len(p) :].tolist()))
    return tuple(rows)
