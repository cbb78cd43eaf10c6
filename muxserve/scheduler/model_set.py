"""The models one scheduler serves: their queues, which are asleep, and the pool split over them.

Models sleep and wake (a sleeping one has no quota and runs no jobs) and join or leave (a mesh
that changes shape); each change re-splits the pool's quotas, now or at the scheduler's next
step. Split from `Scheduler`, which decides when to rebalance and forms the jobs; this owns
which models are here and how the pool is shared between them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from muxserve.kv.block_pool import BlockPool
from muxserve.kv.block_tables import BlockTables
from muxserve.scheduler.model_slot import ModelQueue, ModelSlot
from muxserve.scheduler.quota import QuotaPolicy


class ModelSet:
    """Per-model queues over one pool, and which models are asleep.

    `queues`, `order` (the models in arrival order) and `asleep` are changed in place only, so
    that the scheduler may hold them too (its hot loop reads them). `rebalance_later` asks
    the scheduler to rebalance at its next step.
    """

    def __init__(
        self,
        slots: Sequence[ModelSlot],
        num_blocks: int,
        quota: QuotaPolicy,
        *,
        asleep: Collection[str],
        rebalance_later: Callable[[], None],
    ) -> None:
        """The models in `asleep` start asleep: no quota, no jobs, until `wake`."""
        if not slots:
            raise ValueError("the scheduler needs at least one model")
        self.queues = {s.name: ModelQueue(s) for s in slots}
        self.order = list(self.queues.values())
        self.quota = quota
        self.asleep: set[str] = set(asleep)
        self._rebalance_later = rebalance_later
        # ADBS splits the pool over the awake models; a static partition gives every model its
        # share, then lends the sleeping ones' shares to the awake ones (StaticQuota)
        split = self.awake() if quota.adaptive else self.queues
        initial = quota.initial(num_blocks, split) if split else {}
        self.pool = BlockPool(num_blocks, {n: initial.get(n, 0) for n in self.queues})
        self.tables = BlockTables(self.pool, {s.name: s.layout for s in slots})
        if self.asleep and not quota.adaptive:
            self.rebalance()

    def awake(self) -> dict[str, ModelQueue]:
        """The queues of the models awake (all of them, the same dict, when none sleeps)."""
        if not self.asleep:
            return self.queues
        return {n: q for n, q in self.queues.items() if n not in self.asleep}

    def rebalance(self) -> None:
        """Split the pool's quotas over the awake models again, now."""
        awake = self.awake()
        if awake:
            self.quota.rebalance(self.pool, self.tables, awake)

    # ---- sleep and wake ----------------------------------------------------------------------
    def sleep(self, model: str) -> None:
        """`model` runs no more jobs and its quota returns to the pool at once: ADBS gives it
        out at the next rebalance, a static partition lends it to the awake models now.

        Raises ValueError while it has requests running or a job in flight: those hold blocks.
        """
        q = self.queues[model]
        if q.running or q.busy:
            raise ValueError(f"{model}: {len(q.running)} requests running; it cannot sleep")
        self.asleep.add(model)
        if self.quota.adaptive:
            quotas = {n: self.pool.quota(n) for n in self.queues}
            quotas[model] = 0
            self.pool.set_quotas(quotas)
            self._rebalance_later()
        else:
            self.rebalance()

    def wake(self, model: str) -> None:
        """`model` runs jobs again; ADBS gives it a quota at the next rebalance, a static
        partition its share now (less what borrowers still hold; that comes back as their
        requests end)."""
        self.asleep.discard(model)
        self._rebalance_later()
        if not self.quota.adaptive:
            self.rebalance()

    # ---- models joining and leaving (a mesh that changes shape) ----------------------------
    def add(self, slot: ModelSlot) -> None:
        """A model joins, asleep: no quota and no jobs until `wake`."""
        if slot.name in self.queues:
            raise ValueError(f"{slot.name} is scheduled here already")
        q = ModelQueue(slot)
        self.queues[slot.name] = q
        self.order.append(q)
        self.asleep.add(slot.name)
        self.pool.add_model(slot.name)
        self.tables.layouts[slot.name] = slot.layout
        self._reshaped()

    def remove(self, model: str) -> None:
        """An asleep model with no requests leaves; ValueError otherwise."""
        q = self.queues[model]
        if model not in self.asleep or q.has_work():
            raise ValueError(f"{model}: only an asleep model with no requests can be removed")
        if len(self.queues) == 1:
            raise ValueError(f"{model} is the last model here; it cannot be removed")
        del self.queues[model], self.tables.layouts[model]
        self.order.remove(q)
        self.asleep.discard(model)
        self.pool.remove_model(model)
        self._reshaped()

    def _reshaped(self) -> None:
        """A static partition splits the pool again over the models now here."""
        if not self.quota.adaptive:
            self.quota.initial(self.pool.num_blocks, self.queues)
        self.rebalance()
        self._rebalance_later()
