"""Where each token of a job's batch sits, on the device and as the host knows it.

The model runner builds one `BatchLayout` per job (`from_seqs`); attention over the pool and
the kernels read it. The host keeps the lengths and block tables it was built from
(`HostBatch`), so the CPU path plans its reads without a device round trip, and the padded
device tables are built only for what reads them (the kernels, the padded path). A runner with
`DeviceTables` (any device but the CPU) gives the padded tables ready, gathered on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from muxserve.scheduler.job import SeqWork


@dataclass(frozen=True)
class HostBatch:
    """What the host knows of a batch: the lengths and tables the device tensors came from."""

    starts: tuple[int, ...]  # per sequence: its tokens already in the pool
    q_lens: tuple[int, ...]  # per sequence: its new tokens
    tables: tuple[np.ndarray, ...]  # per sequence: (num_logical, layers, kv_heads) block ids

    def ctx_len(self, i: int) -> int:
        """Tokens of sequence i in the pool after this step."""
        return self.starts[i] + self.q_lens[i]


def pad_tables(tables: Sequence[np.ndarray]) -> np.ndarray:
    """(B, widest, layers, kv_heads) int64: each table, padded with block 0."""
    width = max(t.shape[0] for t in tables)
    out = np.zeros((len(tables), width, *tables[0].shape[1:]), dtype=np.int64)
    for i, t in enumerate(tables):
        out[i, : t.shape[0]] = t
    return out


class BatchLayout:
    """Where each flattened token sits: its sequence, position, and padded row/column.

    `block_tables` (padded, on the device) is what the kernels and the padded path read; a
    layout made by `from_seqs` builds it on first use only, since the CPU path reads the
    host's tables (`host`) instead.
    """

    def __init__(
        self,
        seq_of_token: torch.Tensor,  # (T,) int64
        pos_of_token: torch.Tensor,  # (T,) int64, absolute position in its sequence
        row_of_token: torch.Tensor,  # (T,) int64, index among its sequence's new tokens
        q_lens: torch.Tensor,  # (B,) new tokens per sequence
        ctx_lens: torch.Tensor,  # (B,) tokens in the cache after this step
        block_tables: torch.Tensor | None = None,  # (B, max_logical, layers, kv_heads) int64
        host: HostBatch | None = None,
    ) -> None:
        if block_tables is None and host is None:
            raise ValueError("a BatchLayout needs block_tables or the host's tables")
        self.seq_of_token = seq_of_token
        self.pos_of_token = pos_of_token
        self.row_of_token = row_of_token
        self.q_lens = q_lens
        self.ctx_lens = ctx_lens
        self.host = host
        self._block_tables = block_tables

    @property
    def block_tables(self) -> torch.Tensor:
        """(B, max_logical, layers, kv_heads) int64 on the device, padded with block 0."""
        if self._block_tables is None:
            assert self.host is not None
            padded = torch.from_numpy(pad_tables(self.host.tables))
            self._block_tables = padded.to(self.q_lens.device)
        return self._block_tables

    @classmethod
    def from_seqs(
        cls,
        seqs: Sequence[SeqWork],
        device: torch.device,
        block_tables: torch.Tensor | None = None,
    ) -> BatchLayout:
        """The layout of a job's sequences. `block_tables`: their padded tables, already on the
        device (`DeviceTables`); then every path reads those, the CPU's too, and the host's
        tables are not kept."""
        q_lens = np.array([len(s.token_ids) for s in seqs], dtype=np.int64)
        starts = np.array([s.start_pos for s in seqs], dtype=np.int64)
        seq_of = np.repeat(np.arange(len(seqs)), q_lens)
        row_of = np.arange(q_lens.sum()) - np.repeat(np.cumsum(q_lens) - q_lens, q_lens)

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(device)

        host = None
        if block_tables is None:
            host = HostBatch(
                tuple(s.start_pos for s in seqs),
                tuple(len(s.token_ids) for s in seqs),
                tuple(s.block_table for s in seqs),
            )
        return cls(
            seq_of_token=t(seq_of),
            pos_of_token=t(starts[seq_of] + row_of),
            row_of_token=t(row_of),
            q_lens=t(q_lens),
            ctx_lens=t(starts + q_lens),
            block_tables=block_tables,
            host=host,
        )
