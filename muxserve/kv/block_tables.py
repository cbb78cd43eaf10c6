"""Per-request block tables over the shared pool."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from muxserve.kv.block_pool import BlockPool
from muxserve.kv.layout import KVLayout


class BlockTables:
    """Maps each request to its physical blocks: `(num_logical_blocks, layers, kv_heads)`.

    A table only grows by appending logical blocks, and each growth makes a new array, so a
    table handed to a job in flight is a stable snapshot.
    """

    def __init__(self, pool: BlockPool, layouts: Mapping[str, KVLayout]) -> None:
        self.pool = pool
        self.layouts = dict(layouts)
        self._tables: dict[str, np.ndarray] = {}
        self._owner: dict[str, str] = {}  # request id -> model
        self._capacity: dict[str, int] = {}  # request id -> tokens its table holds
        # the two, read-only (to the type checker), for the scheduler's loops over every
        # request in every step: a dict lookup costs a third of a method call
        self.by_request: Mapping[str, np.ndarray] = self._tables
        self.capacities: Mapping[str, int] = self._capacity

    def table(self, request_id: str) -> np.ndarray:
        return self._tables[request_id]

    def capacity(self, request_id: str) -> int:
        """Tokens the request's table holds now (0 without a table)."""
        return self._capacity.get(request_id, 0)

    def num_logical(self, request_id: str) -> int:
        t = self._tables.get(request_id)
        return 0 if t is None else t.shape[0]

    def blocks_to_cover(self, model: str, request_id: str, num_tokens: int) -> int:
        """Physical blocks the request still needs for `num_tokens` tokens."""
        layout = self.layouts[model]
        missing = layout.logical_blocks_for(num_tokens) - self.num_logical(request_id)
        return max(missing, 0) * layout.blocks_per_logical

    def can_cover(self, model: str, request_id: str, num_tokens: int) -> bool:
        return self.pool.can_allocate(model, self.blocks_to_cover(model, request_id, num_tokens))

    def cover(self, model: str, request_id: str, num_tokens: int) -> None:
        """Grow the request's table to hold `num_tokens` tokens; the caller checked `can_cover`."""
        n = self.blocks_to_cover(model, request_id, num_tokens)
        if request_id not in self._tables:
            layout = self.layouts[model]
            empty = np.empty((0, layout.num_layers, layout.num_kv_heads), dtype=np.int32)
            self._tables[request_id] = empty
            self._owner[request_id] = model
        if n == 0:
            return
        old = self._tables[request_id]
        new = self.pool.allocate(model, n).reshape(-1, *old.shape[1:])
        table = np.concatenate([old, new]) if old.size else new
        self._tables[request_id] = table
        self._capacity[request_id] = table.shape[0] * self.layouts[model].tokens_per_block

    def release(self, request_id: str) -> int:
        """Free every block of the request; returns how many. Unknown ids free nothing."""
        table = self._tables.pop(request_id, None)
        model = self._owner.pop(request_id, None)
        self._capacity.pop(request_id, None)
        if table is None or model is None:
            return 0
        self.pool.free(model, table)
        return table.size

    def holders(self) -> int:
        return len(self._tables)
