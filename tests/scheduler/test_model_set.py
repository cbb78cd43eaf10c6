"""The models of one scheduler on their own: who is asleep, the pool split over the awake ones,
and when a change asks the scheduler to rebalance at its next step. Torch-free, exact counts."""

from __future__ import annotations

import pytest

from muxserve.scheduler.job import Phase
from muxserve.scheduler.model_set import ModelSet
from muxserve.scheduler.quota import AdaptiveQuota, QuotaPolicy, StaticQuota
from tests.helpers.scheduler import make_slot


def model_set(quota: QuotaPolicy, asleep: tuple[str, ...] = ()) -> tuple[ModelSet, list[str]]:
    """Models a, b, c over 30 blocks; the list records each rebalance asked for later."""
    asked: list[str] = []
    models = ModelSet(
        [make_slot(m) for m in "abc"],
        30,
        quota,
        asleep=asleep,
        rebalance_later=lambda: asked.append("later"),
    )
    return models, asked


def quotas(models: ModelSet) -> dict[str, int]:
    return {m: models.pool.quota(m) for m in models.queues}


def test_the_awake_queues_are_the_same_dict_while_none_sleeps() -> None:
    models, _ = model_set(AdaptiveQuota())
    assert models.awake() is models.queues
    assert [q.name for q in models.order] == ["a", "b", "c"]


def test_adaptive_splits_over_the_awake_and_rebalances_a_sleep_later() -> None:
    models, asked = model_set(AdaptiveQuota(), asleep=("c",))
    assert quotas(models) == {"a": 15, "b": 15, "c": 0} and list(models.awake()) == ["a", "b"]
    models.sleep("b")
    assert quotas(models) == {"a": 15, "b": 0, "c": 0} and asked == ["later"]
    models.rebalance()
    assert quotas(models) == {"a": 30, "b": 0, "c": 0}
    models.wake("c")
    assert models.asleep == {"b"} and asked == ["later", "later"]


def test_a_static_partition_lends_a_sleeping_share_at_once() -> None:
    models, asked = model_set(StaticQuota(), asleep=("c",))
    assert quotas(models) == {"a": 15, "b": 15, "c": 0} and asked == []
    models.wake("c")
    assert quotas(models) == {"a": 10, "b": 10, "c": 10} and asked == ["later"]


def test_a_model_with_requests_running_cannot_sleep() -> None:
    models, _ = model_set(AdaptiveQuota())
    models.queues["a"].busy.add(Phase.DECODE)  # a job in flight holds blocks, as running ones do
    with pytest.raises(ValueError, match="a: 0 requests running; it cannot sleep"):
        models.sleep("a")
    assert models.asleep == set()


def test_join_and_leave_keep_queues_order_and_layouts_together() -> None:
    models, asked = model_set(AdaptiveQuota())
    models.add(make_slot("d"))
    assert [q.name for q in models.order] == ["a", "b", "c", "d"] and "d" in models.asleep
    assert "d" in models.tables.layouts and quotas(models)["d"] == 0 and asked == ["later"]
    with pytest.raises(ValueError, match="d is scheduled here already"):
        models.add(make_slot("d"))
    models.remove("d")
    assert list(models.queues) == ["a", "b", "c"] and "d" not in models.tables.layouts
    assert [q.name for q in models.order] == ["a", "b", "c"] and models.asleep == set()
    with pytest.raises(ValueError, match="a: only an asleep model with no requests"):
        models.remove("a")


def test_the_last_model_cannot_leave_and_none_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one model"):
        ModelSet([], 8, AdaptiveQuota(), asleep=(), rebalance_later=lambda: None)
    models = ModelSet(
        [make_slot("a")], 8, AdaptiveQuota(), asleep=("a",), rebalance_later=lambda: None
    )
    with pytest.raises(ValueError, match="a is the last model here; it cannot be removed"):
        models.remove("a")
