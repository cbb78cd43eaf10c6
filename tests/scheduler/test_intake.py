"""Taking requests into a model's queue on their own: a refused request changes nothing, and the
error names the field to change. Torch-free."""

from __future__ import annotations

import pytest

from muxserve.errors import PromptTooLongError, QueueFullError
from muxserve.request import Request
from muxserve.scheduler.intake import Intake
from muxserve.scheduler.model_set import ModelSet
from muxserve.scheduler.quota import AdaptiveQuota
from tests.helpers.scheduler import make_request, make_slot


def intake(max_waiting: int = 4) -> tuple[Intake, ModelSet, dict[str, Request]]:
    """Model a (context 64, 4 tokens a block) alone over 8 blocks: 32 tokens at most."""
    models = ModelSet(
        [make_slot("a", max_waiting=max_waiting)],
        8,
        AdaptiveQuota(),
        asleep=(),
        rebalance_later=lambda: None,
    )
    requests: dict[str, Request] = {}
    return Intake(requests, models.pool, models.quota, lambda: 100.0), models, requests


def test_a_request_joins_the_index_and_the_queue_and_the_model_is_busy() -> None:
    take, models, requests = intake()
    q = models.queues["a"]
    take.add(q, make_request("r0"))
    assert list(requests) == ["r0"] and [r.request_id for r in q.waiting] == ["r0"]
    with pytest.raises(ValueError, match="duplicate request id 'r0'"):
        take.add(q, make_request("r0"))
    assert list(requests) == ["r0"] and len(q.waiting) == 1


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "field", "message"),
    [
        (64, 1, "prompt", "the prompt has 64 tokens; a's context is 64 tokens"),
        (60, 8, "max_tokens", "a's context is 64 tokens, but 68 were asked"),
        (30, 8, "max_tokens", "38 tokens of a need 10 KV blocks; its share of the pool holds 8"),
    ],
)
def test_a_request_that_can_never_run_is_refused_and_nothing_changes(
    prompt: int, max_tokens: int, field: str, message: str
) -> None:
    take, models, requests = intake()
    q = models.queues["a"]
    with pytest.raises(PromptTooLongError, match=message) as err:
        take.add(q, make_request("r0", prompt=prompt, max_tokens=max_tokens))
    assert err.value.param == field
    assert requests == {} and not q.waiting


def test_a_full_queue_is_refused_with_the_model_named() -> None:
    take, models, requests = intake(max_waiting=1)
    q = models.queues["a"]
    take.add(q, make_request("r0"))
    with pytest.raises(QueueFullError, match="a: 1 requests already waiting") as err:
        take.add(q, make_request("r1"))
    assert err.value.param == "model"
    assert list(requests) == ["r0"] and len(q.waiting) == 1
