"""Attention over the unified pool: the torch reference path.

Built once per job from the job's sequences; the model calls it once per layer. It writes the
new K/V into the pool through the block tables, then attends over each sequence's cached
tokens with causal and sliding-window masks. On CUDA, `muxserve.runner.kernels.ops` replaces
it with kernels that read the pool in place; its torch fallback is this class.

How the pool is read. A physical block holds the K and V of one (layer, KV head) for a run of
tokens, so a sequence's keys lie scattered over the pool and are copied into one tensor before
SDPA reads them: one `index_select` of whole blocks for K and one for V, straight into the
layout SDPA takes, in the cache's dtype (SDPA accumulates in float32). On CPU the copy is made
for a group of sequences at a time, small enough to stay in the processor's cache
(`GROUP_BYTES`), into one workspace reused by every group and layer: SDPA then reads the copy
from cache, not memory, and no large tensor is allocated per layer (a fresh allocation of tens
of MiB costs more in page faults than the copy). Each sequence's read starts at the first
block its queries can see (a sliding window skips the rest) and ends at its own length; a
whole prompt from position 0 attends to its own new K/V, read from nowhere.

Grouped-query heads are folded into query rows (query head h reads KV head h // group), so no
K/V head is repeated, and a mask never meets `enable_gqa` (together they fall to SDPA's math
backend on CUDA). Off the CPU, or for a batch built without the host's lengths, the whole
batch is one padded group read through the device's block tables. Neither path reads a value
back from the device when the host's maxima are given.

`gather`, `attend`, `pad_queries`, `unpad` and `mask` are the plain padded reference (float32
scores over the whole batch), for the kernels' tests and the CUDA prefill.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from muxserve.runner.batch_layout import BatchLayout, HostBatch, pad_tables

__all__ = ["GROUP_BYTES", "BatchLayout", "HostBatch", "PagedAttention", "pad_tables"]

# K+V bytes a group of decoding sequences gathers per layer on CPU. Small enough that the copy
# is still in the cache (a shared L3 of tens of MiB) when SDPA reads it, large enough that
# short sequences share the per-group cost (~30 us of Python and dispatch). Measured on a
# 2-core EPYC (32 MiB L3): 2-8 MiB within noise of each other, 0 (one sequence a group) up to
# 2.7x slower at 128 x 128 tokens, the whole batch at once 1.5-2x slower at 16-64 x 256-2048.
GROUP_BYTES = 4 << 20


@dataclass(frozen=True)
class _Read:
    """How one group of sequences reads the pool for the layers with one window size."""

    first: int  # the group's sequences: [first, stop) of the batch
    stop: int
    tokens: slice  # their new tokens' rows in T
    q_len: int  # query rows per sequence (a prefill chunk is a group of its own)
    blocks: tuple[torch.Tensor, ...]  # per layer (Bg * kv_heads * nb,) int64: blocks to copy
    num_blocks: int  # nb: blocks per (sequence, KV head), the widest sequence's
    key_start: int  # the copied keys to attend to: key_len columns from key_start
    key_len: int
    mask: torch.Tensor | None  # (Bg, 1, group * q_len or 1, K) bool: True where allowed
    causal: bool  # a whole prompt from position 0: SDPA's causal mask over its own K/V


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
        group_bytes: int = GROUP_BYTES,  # K+V bytes one group gathers per layer (CPU path)
    ) -> None:
        num_blocks, _, tpb, hd = cache.shape
        if cache.stride()[1:] != (tpb * hd, hd, 1):
            raise ValueError(f"a pool view has contiguous blocks; got strides {cache.stride()}")
        self.cache = cache
        self.softcap = softcap
        self.batch = batch
        self.windows = sliding_windows
        self.group_bytes = group_bytes
        # the K and the V half of every block as one row each: (num_blocks, tpb * hd) views
        start, step = cache.storage_offset(), cache.stride(0)
        self._k_rows = cache.as_strided((num_blocks, tpb * hd), (step, 1), start)
        self._v_rows = cache.as_strided((num_blocks, tpb * hd), (step, 1), start + tpb * hd)
        # and as token rows: (num_blocks, tpb, hd) views, for the writes
        self._k_tokens = self._k_rows.view(num_blocks, tpb, hd)
        self._v_tokens = self._v_rows.view(num_blocks, tpb, hd)
        # the CPU path plans from the host's lengths; elsewhere the batch is one padded group
        self._host = batch.host if cache.device.type == "cpu" else None
        b, host = batch, self._host
        # reading a maximum off the device waits for the stream: on CUDA it stalls the host
        # thread that launches every model's jobs, so the runner passes what it knows
        if max_context is None:
            max_context = (
                int(b.ctx_lens.max())
                if host is None
                else max(map(host.ctx_len, range(len(host.starts))))
            )
        if max_q_len is None:
            max_q_len = int(b.q_lens.max()) if host is None else max(host.q_lens)
        self._max_q = max_q_len
        self._num_logical = -(-max_context // tpb)
        self._masks: dict[int | None, torch.Tensor] = {}
        self._reads: dict[int | None, list[_Read]] = {}
        self._slots: tuple[torch.Tensor, torch.Tensor] | None = None
        self._workspace: tuple[torch.Tensor, torch.Tensor] | None = None
        self._ws_views: dict[tuple[int, ...], tuple[torch.Tensor, ...]] = {}

    # ---- the model's call --------------------------------------------------------------
    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        self.write(layer, k, v)
        return self.attend_pool(layer, q, self.windows[layer], fresh=(k, v))

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the new tokens' K/V, (T, Hkv, hd) each, in the pool through the block tables."""
        ids, off = self._write_slots(layer, k.shape[1])  # (T, Hkv) each
        dtype = self.cache.dtype
        self._k_tokens.index_put_((ids, off), _as(k, dtype))
        self._v_tokens.index_put_((ids, off), _as(v, dtype))

    def attend_pool(
        self,
        layer: int,
        q: torch.Tensor,
        window: int | None,
        fresh: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Causal (and windowed) GQA attention of q (T, Hq, hd) over the pool's K/V of
        `layer`, this step's already written; returns (T, Hq, hd). `fresh`: this step's
        (k, v), (T, Hkv, hd) each, which a whole prompt attends to without reading the pool."""
        if self._host is None:
            return self._attend_padded(layer, q, window)
        reads = self._reads.get(window)
        if reads is None:
            reads = self._reads[window] = self._plan(window, q.shape[1])
        if len(reads) == 1:
            return self._attend_group(reads[0], layer, q, fresh)
        out = q.new_empty(q.shape)  # (T, Hq, hd)
        for read in reads:
            out[read.tokens] = self._attend_group(read, layer, q, fresh)
        return out

    # ---- the CPU path: groups of sequences -----------------------------------------------
    def _plan(self, window: int | None, num_heads: int) -> list[_Read]:
        """Split the batch into groups and work out each one's read of the pool."""
        host = self._host
        assert host is not None
        tpb, hd = self.cache.shape[2], self.cache.shape[3]
        kv_heads = host.tables[0].shape[2]
        group = num_heads // kv_heads
        block_bytes = 2 * tpb * hd * self.cache.element_size() * kv_heads  # one logical, one layer
        reads, i, token = [], 0, 0
        while i < len(host.starts):
            stop, widest = i + 1, -(-host.ctx_len(i) // tpb)
            while (
                host.q_lens[i] == 1
                and stop < len(host.starts)
                and host.q_lens[stop] == 1
                and (stop + 1 - i) * max(widest, -(-host.ctx_len(stop) // tpb)) * block_bytes
                <= self.group_bytes
            ):
                widest = max(widest, -(-host.ctx_len(stop) // tpb))
                stop += 1
            n = sum(host.q_lens[i:stop])
            reads.append(self._read(i, stop, slice(token, token + n), window, group))
            i, token = stop, token + n
        rows = max(r.blocks[0].shape[0] for r in reads)
        if self._workspace is None or self._workspace[0].shape[0] < rows:
            ws = self.cache.new_empty(2, rows, tpb * hd)
            self._workspace = (ws[0], ws[1])
            self._ws_views = {}
        return reads

    def _read(self, first: int, stop: int, tokens: slice, window: int | None, group: int) -> _Read:
        """The blocks, key columns and mask of sequences [first, stop) (decodes, or one chunk)."""
        host = self._host
        assert host is not None
        tpb = self.cache.shape[2]
        seqs = range(first, stop)
        q_len = host.q_lens[first]
        # each sequence reads from the block of the first key its first query sees
        lows = [0 if window is None else max(0, host.starts[i] - window + 1) for i in seqs]
        firsts = [lo // tpb for lo in lows]
        spans = [-(-host.ctx_len(i) // tpb) - f for i, f in zip(seqs, firsts, strict=True)]
        nb = max(spans)
        layers, kv_heads = host.tables[first].shape[1:]
        blocks = np.zeros((layers, len(seqs), kv_heads, nb), dtype=np.int64)  # 0: padding
        for j, (i, f, span) in enumerate(zip(seqs, firsts, spans, strict=True)):
            blocks[:, j, :, :span] = host.tables[i][f : f + span].transpose(1, 2, 0)
        causal = (
            self.softcap is None
            and host.starts[first] == 0
            and q_len > 1
            and (window is None or window >= q_len)
        )
        key_start, key_len, mask = 0, nb * tpb, None
        if len(seqs) == 1:  # keys trimmed to the sequence's own; a mask only within a chunk
            lo, ctx = lows[0] - firsts[0] * tpb, host.ctx_len(first) - firsts[0] * tpb
            key_start, key_len = lo, ctx - lo
            if q_len > 1 and not causal:
                q_pos = host.starts[first] + np.arange(q_len)[:, None]  # (Lq, 1)
                k_pos = lows[0] + np.arange(ctx - lo)[None, :]  # (1, K)
                allowed = k_pos <= q_pos
                if window is not None:
                    allowed &= q_pos - k_pos < window
                mask = torch.from_numpy(np.tile(allowed, (group, 1)))[None, None]
        else:  # decodes of several lengths: padded to the widest, each row its own keys
            ends = np.array([host.ctx_len(i) for i in seqs])[:, None]  # (Bg, 1)
            k_pos = np.array(firsts)[:, None] * tpb + np.arange(nb * tpb)[None, :]  # (Bg, K)
            allowed = k_pos < ends
            if window is not None:
                allowed &= ends - 1 - k_pos < window
            if not allowed.all():
                mask = torch.from_numpy(allowed)[:, None, None, :]  # (Bg, 1, 1, K)
        return _Read(
            first,
            stop,
            tokens,
            q_len,
            torch.from_numpy(blocks.reshape(layers, -1)).unbind(0),
            nb,
            key_start,
            key_len,
            mask,
            causal,
        )

    def _attend_group(
        self,
        read: _Read,
        layer: int,
        q: torch.Tensor,
        fresh: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """(n, Hq, hd): the attention output of one group's n new tokens."""
        dtype = self.cache.dtype
        qg = _as(_rows(q, read.tokens), dtype)  # (n, Hq, hd)
        n, num_heads, hd = qg.shape
        if read.causal and fresh is not None:
            k, v = (_as(_rows(x, read.tokens), dtype).transpose(0, 1)[None] for x in fresh)
        else:
            k, v = self._gather_group(read, layer)  # (Bg, Hkv, key_len, hd) each
        bg, kv_heads = read.stop - read.first, k.shape[1]
        group = num_heads // kv_heads
        if read.causal:
            qh = qg.transpose(0, 1)[None]  # (1, Hq, n, hd)
            out = F.scaled_dot_product_attention(qh, k, v, is_causal=True, enable_gqa=group > 1)
            return _as(out[0].transpose(0, 1), q.dtype)  # (n, Hq, hd)
        lq = read.q_len
        # fold the query heads that share a KV head into its rows: (Bg, Hkv, group * Lq, hd)
        if lq == 1:
            out = self._sdpa(qg.reshape(bg, kv_heads, group, hd), k, v, read.mask)
            return _as(out.reshape(n, num_heads, hd), q.dtype)
        qf = qg.reshape(bg, lq, kv_heads, group, hd).permute(0, 2, 3, 1, 4)
        qf = qf.reshape(bg, kv_heads, group * lq, hd)
        out = self._sdpa(qf, k, v, read.mask)  # (Bg, Hkv, group * Lq, hd)
        out = out.reshape(bg, kv_heads, group, lq, hd).permute(0, 3, 1, 2, 4)
        return _as(out.reshape(n, num_heads, hd), q.dtype)

    def _gather_group(self, read: _Read, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The group's K and V of `layer` copied into the workspace: (Bg, Hkv, key_len, hd)
        views of the copied keys from `key_start`, the same views for every layer."""
        ids = read.blocks[layer]  # (Bg * Hkv * nb,)
        ws_k, ws_v, k, v = self._group_views(read, ids.shape[0])
        torch.index_select(self._k_rows, 0, ids, out=ws_k)  # in place: k and v see it
        torch.index_select(self._v_rows, 0, ids, out=ws_v)
        return k, v

    def _group_views(self, read: _Read, rows: int) -> tuple[torch.Tensor, ...]:
        """The workspace's first `rows` block rows for K and for V, and the (Bg, Hkv,
        key_len, hd) views of them that SDPA reads; made once per step and shape, since a
        view costs microseconds at batch 1, as much as copying a few KiB."""
        bg = read.stop - read.first
        key = (rows, bg, read.num_blocks, read.key_start, read.key_len)
        views = self._ws_views.get(key)
        if views is None:
            assert self._workspace is not None
            tpb, hd = self.cache.shape[2], self.cache.shape[3]
            per_head = read.num_blocks * tpb * hd
            heads = rows // (bg * read.num_blocks)
            shape = (bg, heads, read.key_len, hd)
            strides = (heads * per_head, per_head, hd, 1)
            ws = (self._workspace[0][:rows], self._workspace[1][:rows])
            keys = [
                w.as_strided(shape, strides, w.storage_offset() + read.key_start * hd) for w in ws
            ]
            views = self._ws_views[key] = (*ws, *keys)
        return views

    def _sdpa(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """SDPA of q (..., R, hd) over k/v (..., K, hd) with the same heads, or the float32
        soft-capped math where the model caps its scores (SDPA cannot)."""
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # padded rows see no key
        return torch.matmul(probs.to(v.dtype), v)

    def _write_slots(self, layer: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ids and offsets, (T, Hkv) each, where the new tokens' K/V of `layer` go."""
        b, host, tpb = self.batch, self._host, self.cache.shape[2]
        if host is None:
            slot_block = b.pos_of_token // tpb  # (T,)
            ids = b.block_tables[b.seq_of_token, slot_block, layer]  # (T, Hkv)
            off = (b.pos_of_token % tpb)[:, None].expand(-1, kv_heads)  # (T, Hkv)
            return ids, off
        if self._slots is None:
            rows = [
                t[np.arange(s, s + n) // tpb]  # (n, layers, Hkv)
                for s, n, t in zip(host.starts, host.q_lens, host.tables, strict=True)
            ]
            ids_all = np.concatenate(rows).transpose(1, 0, 2)  # (L, T, Hkv)
            starts, lens = host.starts, host.q_lens
            pos = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lens, strict=True)])
            off = torch.from_numpy(pos % tpb)[:, None].expand(-1, kv_heads)  # (T, Hkv)
            self._slots = (torch.from_numpy(np.ascontiguousarray(ids_all, np.int64)), off)
        return self._slots[0][layer], self._slots[1]

    # ---- one padded group, through the device's tables --------------------------------
    def _attend_padded(self, layer: int, q: torch.Tensor, window: int | None) -> torch.Tensor:
        """The whole batch as one group: queries padded per sequence, keys to the longest."""
        b, tpb, hd = self.batch, self.cache.shape[2], self.cache.shape[3]
        table = b.block_tables[:, : self._num_logical, layer]  # (B, nlb, Hkv)
        bsz, nlb, kv_heads = table.shape
        ids = table.transpose(1, 2).reshape(-1)  # (B * Hkv * nlb,) sequence, head, block
        k = self._k_rows.index_select(0, ids).view(bsz, kv_heads, nlb * tpb, hd)
        v = self._v_rows.index_select(0, ids).view(bsz, kv_heads, nlb * tpb, hd)
        qpad = self.pad_queries(q.to(self.cache.dtype))  # (B, Hq, Lq, hd)
        num_heads, lq = qpad.shape[1], qpad.shape[2]
        group = num_heads // kv_heads
        qf = qpad.reshape(bsz, kv_heads, group * lq, hd)  # (B, Hkv, group * Lq, hd)
        m = self.mask(window)  # (B, 1, Lq, K)
        mask = m[:, :, None].expand(-1, -1, group, -1, -1).reshape(bsz, 1, group * lq, -1)
        out = self._sdpa(qf, k, v, mask)  # (B, Hkv, group * Lq, hd)
        return self.unpad(out.reshape(bsz, num_heads, lq, hd)).to(q.dtype)  # (T, Hq, hd)

    # ---- the plain padded reference -------------------------------------------------------
    def mask(self, window: int | None) -> torch.Tensor:
        """(B, 1, Lq, K) bool: which cached keys each padded query row may see."""
        if window not in self._masks:
            b, tpb = self.batch, self.cache.shape[2]
            device = self.cache.device
            key_pos = torch.arange(self._num_logical * tpb, device=device)  # (K,)
            steps = torch.arange(self._max_q, device=device)
            q_pos = b.ctx_lens[:, None] - b.q_lens[:, None] + steps  # (B, Lq)
            m = key_pos[None, None, :] <= q_pos[:, :, None]  # (B, Lq, K)
            if window is not None:
                m = m & (q_pos[:, :, None] - key_pos[None, None, :] < window)
            self._masks[window] = m[:, None]
        return self._masks[window]

    def gather(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sequence's cached K and V of `layer`: (B, Hkv, nlb * tpb, hd) each."""
        b, tpb, hd = self.batch, self.cache.shape[2], self.cache.shape[3]
        table = b.block_tables[:, : self._num_logical, layer]  # (B, nlb, Hkv)
        bsz, nlb, kv_heads = table.shape
        ids = table.transpose(1, 2).reshape(-1)  # (B * Hkv * nlb,) sequence, head, block
        keys = self._k_rows.index_select(0, ids).view(bsz, kv_heads, nlb * tpb, hd)
        vals = self._v_rows.index_select(0, ids).view(bsz, kv_heads, nlb * tpb, hd)
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
        """Causal (and windowed) GQA attention of q (T, Hq, hd) over `gather`'s K/V, with
        float32 scores: the plain reference the kernels are checked against."""
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


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype`; without an op where it is already (at batch 1 an op costs microseconds)."""
    return x if x.dtype == dtype else x.to(dtype)


def _rows(x: torch.Tensor, tokens: slice) -> torch.Tensor:
    """`x[tokens]`; `x` itself where the slice takes every row (one group: the whole batch)."""
    return x if tokens.start == 0 and tokens.stop == x.shape[0] else x[tokens]
