"""Attention over the unified pool: the torch reference path (gathers blocks).

Built once per job from the job's sequences; the model calls it once per layer. It writes the
new K/V into the pool through the block tables, then attends over each sequence's cached
tokens with causal and sliding-window masks. On CUDA, `muxserve.ops` replaces it with kernels
that read the pool in place; its torch fallback is this class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from muxserve.scheduler.job import SeqWork


@dataclass
class BatchLayout:
    """Where each flattened token sits: its sequence, position, and padded row/column."""

    seq_of_token: torch.Tensor  # (T,) int64
    pos_of_token: torch.Tensor  # (T,) int64, absolute position in its sequence
    row_of_token: torch.Tensor  # (T,) int64, index among its sequence's new tokens
    q_lens: torch.Tensor  # (B,) new tokens per sequence
    ctx_lens: torch.Tensor  # (B,) tokens in the cache after this step
    block_tables: torch.Tensor  # (B, max_logical, layers, kv_heads) int64, padded with 0

    @classmethod
    def from_seqs(cls, seqs: Sequence[SeqWork], device: torch.device) -> BatchLayout:
        q_lens = np.array([len(s.token_ids) for s in seqs], dtype=np.int64)
        starts = np.array([s.start_pos for s in seqs], dtype=np.int64)
        seq_of = np.repeat(np.arange(len(seqs)), q_lens)
        row_of = np.arange(q_lens.sum()) - np.repeat(np.cumsum(q_lens) - q_lens, q_lens)
        width = max(s.block_table.shape[0] for s in seqs)
        tables = np.zeros((len(seqs), width, *seqs[0].block_table.shape[1:]), dtype=np.int64)
        for i, s in enumerate(seqs):
            tables[i, : s.block_table.shape[0]] = s.block_table

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(device)

        return cls(
            seq_of_token=t(seq_of),
            pos_of_token=t(starts[seq_of] + row_of),
            row_of_token=t(row_of),
            q_lens=t(q_lens),
            ctx_lens=t(starts + q_lens),
            block_tables=t(tables),
        )


class PagedAttention:
    """The `Attention` the model calls per layer, over one job's batch and the pool."""

    def __init__(
        self,
        cache: torch.Tensor,  # (num_blocks, 2, tokens_per_block, head_dim), the model's pool view
        batch: BatchLayout,
        sliding_windows: Sequence[int | None],  # per layer
        max_q_len: int | None = None,  # the batch's longest chunk, if the host knows it
        max_context: int | None = None,  # its longest context after this step, likewise
        softcap: float | None = None,  # scores -> softcap * tanh(scores / softcap) (Gemma 2)
    ) -> None:
        self.cache = cache
        self.softcap = softcap
        self.batch = batch
        self.windows = sliding_windows
        tpb = cache.shape[2]
        b = batch
        # where each new token's K/V go: its logical block and offset inside it
        self._slot_block = b.pos_of_token // tpb  # (T,)
        self._slot_offset = b.pos_of_token % tpb  # (T,)
        # reading a maximum off the device waits for the stream: on CUDA it stalls the host
        # thread that launches every model's jobs, so the runner passes what it knows
        max_ctx = int(b.ctx_lens.max()) if max_context is None else max_context
        max_q = int(b.q_lens.max()) if max_q_len is None else max_q_len
        self._max_q = max_q
        self._num_logical = -(-max_ctx // tpb)
        key_pos = torch.arange(self._num_logical * tpb, device=cache.device)  # (K,)
        q_pos = b.ctx_lens[:, None] - b.q_lens[:, None] + torch.arange(max_q, device=cache.device)
        self._q_pos = q_pos  # (B, Lq) absolute position of each padded query row
        self._causal = key_pos[None, None, :] <= q_pos[:, :, None]  # (B, Lq, K)
        self._key_pos = key_pos
        self._masks: dict[int | None, torch.Tensor] = {}

    def mask(self, window: int | None) -> torch.Tensor:
        """(B, 1, Lq, K) bool: which cached keys each padded query row may see."""
        if window not in self._masks:
            m = self._causal
            if window is not None:
                m = m & (self._q_pos[:, :, None] - self._key_pos[None, None, :] < window)
            self._masks[window] = m[:, None]
        return self._masks[window]

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        self.write(layer, k, v)
        keys, vals = self.gather(layer)
        return self.attend(q, keys, vals, self.windows[layer])

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new tokens' K/V, (T, Hkv, hd) each, in the pool through the block tables."""
        b = self.batch
        kv_heads = k.shape[1]
        ids = b.block_tables[b.seq_of_token, self._slot_block, layer]  # (T, Hkv)
        off = self._slot_offset[:, None].expand(-1, kv_heads)  # (T, Hkv)
        self.cache[ids, 0, off] = k.to(self.cache.dtype)
        self.cache[ids, 1, off] = v.to(self.cache.dtype)

    def gather(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sequence's cached K and V of `layer`: (B, Hkv, nlb * tpb, hd) each."""
        b = self.batch
        table = b.block_tables[:, : self._num_logical, layer]  # (B, nlb, Hkv)
        blocks = self.cache[table]  # (B, nlb, Hkv, 2, tpb, hd)
        bsz, nlb, kv_heads, _, tpb, hd = blocks.shape
        keys = blocks[:, :, :, 0].permute(0, 2, 1, 3, 4).reshape(bsz, kv_heads, nlb * tpb, hd)
        vals = blocks[:, :, :, 1].permute(0, 2, 1, 3, 4).reshape(bsz, kv_heads, nlb * tpb, hd)
        return keys, vals

    def pad_queries(self, q: torch.Tensor) -> torch.Tensor:
        """(T, Hq, hd) -> (B, Hq, Lq, hd): each sequence's query rows, zeros past its own."""
        b = self.batch
        qpad = q.new_zeros(b.q_lens.shape[0], self._max_q, q.shape[1], q.shape[2])
        qpad[b.seq_of_token, b.row_of_token] = q
        return qpad.transpose(1, 2)

    def unpad(self, out: torch.Tensor) -> torch.Tensor:
        """(B, Hq, Lq, hd) -> (T, Hq, hd): the rows of real query tokens, in token order."""
        b = self.batch
        return out.transpose(1, 2)[b.seq_of_token, b.row_of_token]

    def attend(
        self, q: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, window: int | None
    ) -> torch.Tensor:
        """Causal (and windowed) GQA attention of q (T, Hq, hd) over `gather`'s K/V."""
        hd = keys.shape[-1]
        kv_heads = keys.shape[1]
        # pad the queries per sequence: (B, Hq, Lq, hd)
        qpad = self.pad_queries(q)
        group = q.shape[1] // kv_heads
        keys = keys.repeat_interleave(group, dim=1)  # (B, Hq, K, hd)
        vals = vals.repeat_interleave(group, dim=1)
        scores = torch.matmul(qpad.float(), keys.float().transpose(-1, -2)) / math.sqrt(hd)
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores.masked_fill(~self.mask(window), float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # padded rows see no key
        out = torch.matmul(probs.to(vals.dtype), vals)  # (B, Hq, Lq, hd)
        return self.unpad(out).to(q.dtype)  # (T, Hq, hd)
