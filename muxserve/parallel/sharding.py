"""Load a model once per tensor-parallel rank, in memory that worker processes can map."""

from __future__ import annotations

from pathlib import Path

import torch

from muxserve.models.llama import LlamaForCausalLM
from muxserve.models.loader import load_model


def load_rank_models(
    path: str | Path, dtype: torch.dtype, device: torch.device, world_size: int
) -> list[tuple[LlamaForCausalLM, torch.device]]:
    """The model for each rank, with the device that rank runs on; weights shared, not copied.

    On CPU the parameters move to shared memory (the prefill and decode workers of a rank map
    the same pages); on CUDA they stay where they are and travel to workers by CUDA IPC.
    """
    if world_size != 1:
        raise NotImplementedError("tensor parallelism")
    model, _ = load_model(path, dtype, device)
    if device.type == "cpu":
        model.share_memory()
    return [(model, device)]
