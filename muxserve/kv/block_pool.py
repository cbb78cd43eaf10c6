"""The pool's physical block ids: free list, owners, and per-model quota and usage."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

_FREE = -1  # owner code of a free block; internal to this module


class BlockPool:
    """Hands out physical block ids to models, within each model's quota.

    Invariants (`check_integrity`): free + used == total, no block owned twice, every
    model's usage <= its quota, and the quotas sum to at most the pool.
    """

    def __init__(self, num_blocks: int, quotas: Mapping[str, int]) -> None:
        if num_blocks < 1:
            raise ValueError(f"the pool needs at least one block, got {num_blocks}")
        if sum(quotas.values()) > num_blocks:
            raise ValueError(f"quotas {dict(quotas)} exceed the pool's {num_blocks} blocks")
        self.num_blocks = num_blocks
        self._models = list(quotas)
        self._index = {m: i for i, m in enumerate(self._models)}  # owner codes, never reused
        self._next_code = len(self._models)
        self._quota = dict(quotas)
        self._used = dict.fromkeys(self._models, 0)
        # the free list, FIFO, as a ring over one array: ids taken from the head and returned
        # at the tail, a whole logical block (layers x kv_heads ids) in one array operation
        self._ring = np.arange(num_blocks, dtype=np.int32)
        self._head = 0  # index in the ring of the next id to hand out
        self._num_free = num_blocks
        self._owner = np.full(num_blocks, _FREE, dtype=np.int32)
        self._scratch = np.empty(num_blocks, dtype=np.int32)  # for `_repeats`

    # ---- queries ---------------------------------------------------------------------
    @property
    def models(self) -> list[str]:
        return list(self._models)

    @property
    def num_free(self) -> int:
        return self._num_free

    def quota(self, model: str) -> int:
        return self._quota[model]

    def used(self, model: str) -> int:
        return self._used[model]

    def headroom(self, model: str) -> int:
        """Blocks the model may still take: within its quota and what is free."""
        return min(self._quota[model] - self._used[model], self._num_free)

    def can_allocate(self, model: str, n: int) -> bool:
        return n <= self.headroom(model)

    # ---- actions ---------------------------------------------------------------------
    def allocate(self, model: str, n: int) -> np.ndarray:
        """Take n free blocks for `model`; the caller checked `can_allocate`."""
        if not self.can_allocate(model, n):
            raise RuntimeError(
                f"{model}: cannot allocate {n} blocks (used {self._used[model]}, "
                f"quota {self._quota[model]}, free {self._num_free})"
            )
        ids = self._ring.take(np.arange(self._head, self._head + n), mode="wrap")  # (n,)
        self._head = (self._head + n) % self.num_blocks
        self._num_free -= n
        self._owner[ids] = self._index[model]
        self._used[model] += n
        return ids

    def free(self, model: str, ids: np.ndarray) -> None:
        """Return blocks `model` owns to the free list."""
        ids = np.asarray(ids, dtype=np.int32).ravel()
        if ids.size == 0:
            return
        if not np.all(self._owner[ids] == self._index[model]) or self._repeats(ids):
            raise RuntimeError(f"{model}: freeing blocks it does not own")
        self._owner[ids] = _FREE
        tail = self._head + self._num_free
        self._ring.put(np.arange(tail, tail + ids.size), ids, mode="wrap")
        self._num_free += ids.size
        self._used[model] -= ids.size

    def _repeats(self, ids: np.ndarray) -> bool:
        """Whether an id occurs twice in `ids`: each id's slot in a scratch array is written
        with its position, and a repeated id keeps only its last one. Linear, where
        `np.unique` sorts or hashes (it was 14-20 % of a simulation, which frees every
        finished request's blocks)."""
        at = np.arange(ids.size, dtype=np.int32)
        self._scratch[ids] = at
        return not np.array_equal(self._scratch[ids], at)

    def add_model(self, model: str) -> None:
        """A model joins the pool with no quota and no blocks (a mesh that changes shape)."""
        if model in self._index:
            raise ValueError(f"{model} is in the pool already")
        self._models.append(model)
        self._index[model] = self._next_code
        self._next_code += 1
        self._quota[model] = 0
        self._used[model] = 0

    def remove_model(self, model: str) -> None:
        """A model leaves the pool; it must hold no blocks. Its quota goes back."""
        if self._used[model]:
            raise ValueError(f"{model} holds {self._used[model]} blocks; it cannot leave the pool")
        self._models.remove(model)
        del self._index[model], self._quota[model], self._used[model]

    def set_quotas(self, quotas: Mapping[str, int]) -> None:
        """Replace the quotas; nobody may drop below what it holds, nor the sum exceed the pool."""
        if set(quotas) != set(self._models):
            raise ValueError(f"quotas must name exactly {self._models}")
        short = [m for m, q in quotas.items() if q < self._used[m]]
        if short:
            raise ValueError(f"quota below usage for {short}")
        if sum(quotas.values()) > self.num_blocks:
            raise ValueError(f"quotas {dict(quotas)} exceed the pool's {self.num_blocks} blocks")
        self._quota = dict(quotas)

    def check_integrity(self) -> None:
        """Raise AssertionError if the accounting is inconsistent."""
        free = self._free_ids()
        assert np.unique(free).size == free.size, "a block is on the free list twice"
        assert np.all(self._owner[free] == _FREE), "a free-listed block has an owner"
        owned = int(np.count_nonzero(self._owner != _FREE))
        assert owned + free.size == self.num_blocks, "free + used != total"
        counts = np.bincount(self._owner[self._owner != _FREE], minlength=self._next_code)
        for m, i in self._index.items():
            assert counts[i] == self._used[m], f"{m}: usage {self._used[m]} != owned {counts[i]}"
            assert self._used[m] <= self._quota[m], f"{m}: usage above quota"
        assert sum(self._quota.values()) <= self.num_blocks, "quotas exceed the pool"

    def _free_ids(self) -> np.ndarray:
        """The free list, head first."""
        return self._ring.take(np.arange(self._head, self._head + self._num_free), mode="wrap")

    def snapshot(self) -> dict[str, tuple[int, int]]:
        """model -> (used, quota)."""
        return {m: (self._used[m], self._quota[m]) for m in self._models}


def proportional_split(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Split `total` integer units by weight (largest remainder), so the parts sum to `total`."""
    names = list(weights)
    w = np.array([max(weights[n], 0.0) for n in names], dtype=np.float64)
    if w.sum() <= 0:
        w = np.ones(len(names))
    exact = w / w.sum() * total
    parts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - parts), kind="stable")[: total - int(parts.sum())]:
        parts[i] += 1
    return {n: int(p) for n, p in zip(names, parts, strict=True)}
