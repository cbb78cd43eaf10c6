"""How the unified pool is split between models: static, or adaptive (ADBS)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from muxserve.kv.block_pool import BlockPool, proportional_split
from muxserve.kv.block_tables import BlockTables
from muxserve.request import Request
from muxserve.scheduler.model_slot import ModelQueue

_SHARE_SLACK = 1e-6  # shares that sum to 1 in decimal may not in binary floating point


class QuotaPolicy(Protocol):
    adaptive: bool  # whether `rebalance` ever moves blocks

    def initial(self, num_blocks: int, queues: Mapping[str, ModelQueue]) -> dict[str, int]: ...

    def ceiling(self, pool: BlockPool, model: str) -> int:
        """The most blocks `model` could ever hold: a request needing more can never run."""
        ...

    def rebalance(
        self, pool: BlockPool, tables: BlockTables, queues: Mapping[str, ModelQueue]
    ) -> None: ...


def quota_weights(queues: Mapping[str, ModelQueue]) -> dict[str, float]:
    """A model's claim on the pool: its rate times its KV bytes per token."""
    return {n: q.slot.rate * q.slot.layout.kv_bytes_per_token for n, q in queues.items()}


def initial_split(
    num_blocks: int, queues: Mapping[str, ModelQueue], weights: Mapping[str, float]
) -> dict[str, int]:
    """First quotas: the plan's `kv_share` where a model has one, the rest by `weights`.

    A model with a share gets that fraction of the pool; the models without one split what
    the shares leave in proportion to `weights`. When every model has a share, the shares are
    normalised so the whole pool is handed out (a plan rounds its shares down, so they sum to
    just under 1). With no share at all this is a split by `weights`. Blocks are whole, by
    largest remainder, in model order.
    """
    shares = {n: q.slot.kv_share for n, q in queues.items() if q.slot.kv_share is not None}
    if not shares:
        return proportional_split(num_blocks, weights)
    planned = sum(shares.values())
    if planned > 1.0 + _SHARE_SLACK:
        listed = ", ".join(f"{n} {s:g}" for n, s in shares.items())
        raise ValueError(f"the models' kv_share sum to {planned:g} > 1 ({listed})")
    rest = {n: weights[n] for n in queues if n not in shares}
    left = max(1.0 - planned, 0.0)
    total = sum(rest.values())
    exact = {
        n: shares[n] if n in shares else left * (rest[n] / total if total > 0 else 1.0 / len(rest))
        for n in queues
    }
    return proportional_split(num_blocks, exact)


class StaticQuota:
    """A fixed partition (the spatial baseline): each model owns its plan's share of the pool,
    or an equal part of it.

    A sleeping model's share is lent to the awake models, in proportion to their own shares,
    and comes back when it wakes: a borrower that holds more than its share then keeps what
    it holds (it can take no more) and the woken model has what is left of its share, until
    the borrower's requests end and free the rest. A model is never refused a request its
    own share could hold (`ceiling`).
    """

    adaptive = False

    def __init__(self) -> None:
        self.shares: dict[str, int] = {}  # each model's own share of the pool, in blocks

    def initial(self, num_blocks: int, queues: Mapping[str, ModelQueue]) -> dict[str, int]:
        """The plan's shares where given; the models without one split the rest equally."""
        self.shares = initial_split(num_blocks, queues, dict.fromkeys(queues, 1.0))
        return dict(self.shares)

    def ceiling(self, pool: BlockPool, model: str) -> int:
        return self.shares.get(model, pool.quota(model))

    def rebalance(
        self, pool: BlockPool, tables: BlockTables, queues: Mapping[str, ModelQueue]
    ) -> None:
        """Quotas for the awake models in `queues`: own share plus what sleeping ones lend."""
        used = {n: pool.used(n) for n in pool.models}
        now = {n: pool.quota(n) for n in pool.models}
        quotas = lent_quotas(self.shares, used, now, list(queues), pool.num_blocks)
        pool.set_quotas({n: quotas.get(n, used[n]) for n in pool.models})


def lent_quotas(
    shares: Mapping[str, int],
    used: Mapping[str, int],
    quotas_now: Mapping[str, int],
    awake: list[str],
    num_blocks: int,
) -> dict[str, int]:
    """The awake models' quotas in a static partition whose sleeping models lend their shares.

    Each awake model's target is its share plus the asleep models' shares split in proportion
    to the awake shares. A model holding more than its target keeps what it holds; the blocks
    that leaves short are taken first from the models owed blocks (a quota now below their
    target: a model just woken), then from the others, each time in proportion to their
    headroom (target - used). Exact, in whole blocks.
    """
    if not awake:
        return {}
    lend = sum(b for n, b in shares.items() if n not in awake)
    extra = proportional_split(lend, {n: float(shares[n]) for n in awake})
    target = {n: shares[n] + extra[n] for n in awake}
    quotas = {n: max(target[n], used[n]) for n in awake}
    short = sum(quotas.values()) + sum(used[n] for n in shares if n not in awake) - num_blocks
    owed = [n for n in awake if quotas_now[n] < target[n]]
    for group in (owed, [n for n in awake if n not in owed]):  # blocks still lent out
        room = {n: float(target[n] - used[n]) for n in group if target[n] > used[n]}
        take = min(short, int(sum(room.values())))
        if take <= 0:
            continue
        for n, t in proportional_split(take, room).items():
            quotas[n] -= t
        short -= take
    return quotas


class AdaptiveQuota:
    """ADBS quotas: start from the plan's KV shares (or in proportion to rate x KV bytes/token),
    then follow the load.

    At each rebalance a model keeps what its requests hold; the free blocks go first to the
    model of the oldest waiting request, enough to admit it, then to models with unmet demand
    (requests waiting for blocks, decodes about to cross a block boundary), in proportion to
    their weight and capped at that demand, and the rest by weight to everyone, so an idle model
    still has room for its next request. Without the first step, shares split by weight could
    leave every model short of its next request, with nothing running to free blocks: a deadlock.
    """

    adaptive = True

    def initial(self, num_blocks: int, queues: Mapping[str, ModelQueue]) -> dict[str, int]:
        """The plan's shares where given; the models without one split the rest by weight."""
        return initial_split(num_blocks, queues, quota_weights(queues))

    def ceiling(self, pool: BlockPool, model: str) -> int:
        return pool.num_blocks

    def rebalance(
        self, pool: BlockPool, tables: BlockTables, queues: Mapping[str, ModelQueue]
    ) -> None:
        weights = quota_weights(queues)
        demand = {n: _demand(q, tables, pool.num_free) for n, q in queues.items()}
        give = dict.fromkeys(queues, 0)
        spare = pool.num_free
        head = _oldest_waiting(queues)
        if head is not None:
            need = queues[head.model].slot.layout.physical_blocks_for(head.num_tokens + 1)
            if need <= spare:
                give[head.model] = need
                spare -= need
        # a list in model order, not a set: ties in the split must not depend on string hashes
        hungry = [n for n, d in demand.items() if d > give[n]]
        while spare > 0 and hungry:  # water-filling over models with demand
            split = proportional_split(spare, {n: weights[n] for n in hungry})
            for n in hungry:
                take = min(split[n], demand[n] - give[n])
                give[n] += take
                spare -= take
            hungry = [n for n in hungry if give[n] < demand[n]]
        for n, extra in proportional_split(spare, weights).items():
            give[n] += extra
        # models not in `queues` (asleep) hold nothing and get nothing
        pool.set_quotas({n: pool.used(n) + give.get(n, 0) for n in pool.models})


def _oldest_waiting(queues: Mapping[str, ModelQueue]) -> Request | None:
    heads = [q.waiting[0] for q in queues.values() if q.waiting]
    return min(heads, key=lambda r: r.arrival_time, default=None)


def _demand(q: ModelQueue, tables: BlockTables, cap: int) -> int:
    """Blocks the model could use now beyond what it holds."""
    layout, capacities = q.slot.layout, tables.capacities
    need = 0
    for r in q.running:  # the next token of each running request, where its blocks end
        after = len(r.prompt_token_ids) + len(r.output_token_ids) + 1  # r.num_tokens + 1
        if after > capacities.get(r.request_id, 0):
            need += tables.blocks_to_cover(q.name, r.request_id, after)
    for r in q.waiting:
        if need >= cap:
            break
        need += layout.physical_blocks_for(r.num_tokens + 1)
    return min(need, cap)
