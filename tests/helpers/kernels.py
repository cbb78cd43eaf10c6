"""Pool views and decode batches for the attention and kernel tests."""

from __future__ import annotations

import torch

from muxserve.kv.layout import KVLayout
from muxserve.runner.attention import BatchLayout
from muxserve.runner.kv_pool import KVPool

CPU = torch.device("cpu")


def make_cache(
    num_blocks: int, tpb: int, head_dim: int, dtype: torch.dtype, tail: int = 16, seed: int = 0
) -> torch.Tensor:
    """A pool view of random contents; `tail` unused bytes at the end of each block."""
    item = torch.empty((), dtype=dtype).element_size()
    layout = KVLayout(1, 1, head_dim, item, 2 * tpb * head_dim * item + tail)
    cache = KVPool(num_blocks, layout.block_bytes, CPU).view(layout, dtype)
    gen = torch.Generator().manual_seed(seed)
    cache.copy_(torch.randn(num_blocks, 2, tpb, head_dim, generator=gen).to(dtype))
    return cache


def decode_batch(
    ctx: list[int], tpb: int, layers: int, kv_heads: int, num_blocks: int, seed: int
) -> BatchLayout:
    """One decode token per sequence at position ctx - 1; distinct shuffled block ids."""
    gen = torch.Generator().manual_seed(seed)
    nlb = max(-(-c // tpb) for c in ctx)
    ids = torch.randperm(num_blocks, generator=gen)[: len(ctx) * nlb * layers * kv_heads]
    ctx_t = torch.tensor(ctx)
    return BatchLayout(
        seq_of_token=torch.arange(len(ctx)),
        pos_of_token=ctx_t - 1,
        row_of_token=torch.zeros(len(ctx), dtype=torch.int64),
        q_lens=torch.ones(len(ctx), dtype=torch.int64),
        ctx_lens=ctx_t,
        block_tables=ids.view(len(ctx), nlb, layers, kv_heads).contiguous(),
    )
