"""Load a model once per tensor-parallel rank, in memory that worker processes can map.

A rank's shard is built like any model (`registry.build_model(config, tp_size)`) and filled from
the whole model's tensors: where a parameter is smaller than the whole along one dimension,
the rank takes its contiguous chunk of it (heads, features, vocabulary rows, each expert's
inner width); where it is the same size (embeddings, norms, routers, row-parallel biases) it
takes all of it. Families whose checkpoints fuse tensors split them on load (Phi-3), so every
parameter splits along one dimension.
"""

from __future__ import annotations

from pathlib import Path

import torch

from muxserve.models.causal_lm import CausalLM
from muxserve.models.hf_config import check_divisible
from muxserve.models.loader import load_model, place_on_cpu
from muxserve.models.registry import build_model
from muxserve.models.stacked import bind_stacks


def load_rank_models(
    path: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    world_size: int,
    max_model_len: int | None = None,
) -> list[tuple[CausalLM, torch.device]]:
    """The model for each rank, with the device that rank runs on; weights shared, not copied.
    RoPE tables hold `max_model_len` positions (the served context).

    On CPU the parameters move to shared memory (the prefill and decode workers of a rank map
    the same pages); on CUDA they stay on the rank's GPU and reach workers by CUDA IPC.
    """
    if world_size == 1:
        model, _ = load_model(path, dtype, device, max_model_len)
        _share(model)
        return [(model, device)]
    whole, config = load_model(path, dtype, "cpu", max_model_len)
    check_divisible(config, world_size)
    ranks = []
    for rank in range(world_size):
        dev = rank_device(device, rank)
        shard = shard_model(whole, rank, world_size, dev, max_model_len)
        _share(shard)
        ranks.append((shard, dev))
    return ranks


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r of a mesh runs on the r-th GPU from `device`; every rank of a CPU mesh on the CPU."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


@torch.no_grad()
def shard_model(
    whole: CausalLM,
    rank: int,
    world_size: int,
    device: torch.device,
    max_model_len: int | None = None,
) -> CausalLM:
    """Rank `rank`'s shard of `whole` on `device`, in eval mode with gradients off."""
    with torch.device("meta"):
        shard = build_model(whole.config, tp_size=world_size)
    shard = shard.to(dtype=whole.dtype)
    if device.type == "cpu":
        place_on_cpu(shard)  # laid out as a whole model is (load_model)
    else:
        shard = shard.to_empty(device=device)
    full = dict(whole.named_parameters())
    for name, param in shard.named_parameters():
        param.copy_(_rank_slice(full[name], param.shape, rank, world_size))
    shard.eval()
    shard.requires_grad_(False)
    shard.build_rope_cache(device, max_model_len)
    return shard


def _rank_slice(whole: torch.Tensor, shape: torch.Size, rank: int, world_size: int) -> torch.Tensor:
    if whole.shape == shape:
        return whole
    dims = [d for d in range(whole.dim()) if whole.shape[d] != shape[d]]
    if len(dims) != 1 or whole.shape[dims[0]] != shape[dims[0]] * world_size:
        raise ValueError(f"cannot shard a {tuple(whole.shape)} tensor into {tuple(shape)}")
    return whole.chunk(world_size, dim=dims[0])[rank]


def _share(model: CausalLM) -> None:
    if next(model.parameters()).device.type == "cpu":
        model.share_memory()  # each storage moves whole, so the stacks' views move with it
        bind_stacks(model)  # (their addresses changed: bound here, not on the first step)
