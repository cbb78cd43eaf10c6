"""Taking a request into its model's waiting queue, or refusing it before anything is allocated.

A request that could never run is refused with PromptTooLongError naming the field to change
(its prompt, or max_tokens: past the model's context, or past the most of the pool the model
may hold); one that would wait too long with QueueFullError and how long to wait before trying
again. Split from `Scheduler`; admission into the pool (waiting to running) is the `Batcher`'s.
"""

from __future__ import annotations

from collections.abc import Callable

from muxserve.errors import PromptTooLongError, QueueFullError
from muxserve.kv.block_pool import BlockPool
from muxserve.request import Request
from muxserve.scheduler.model_slot import ModelQueue, ModelSlot
from muxserve.scheduler.quota import QuotaPolicy
from muxserve.scheduler.service_rate import retry_after_s


class Intake:
    """Checks and queues new requests; `requests` is the scheduler's index of those it holds."""

    def __init__(
        self,
        requests: dict[str, Request],
        pool: BlockPool,
        quota: QuotaPolicy,
        clock: Callable[[], float],
    ) -> None:
        self.requests = requests
        self.pool = pool
        self.quota = quota
        self.clock = clock

    def add(self, q: ModelQueue, req: Request) -> None:
        """Queue `req` on its model's queue `q`; raises before anything changes if it can never
        run, if the queue is full, or if its id is taken."""
        self.check_length(q.slot, req)
        self.check_queue(q)
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        if not q.has_work():
            q.service.on_busy(self.clock())
        self.requests[req.request_id] = req
        q.waiting.append(req)

    def check_length(self, slot: ModelSlot, req: Request) -> None:
        """PromptTooLongError when the prompt, or the prompt and its max_tokens, cannot fit the
        model's context or the most of the pool the model may ever hold."""
        total = req.num_prompt_tokens + req.params.max_tokens
        if req.num_prompt_tokens >= slot.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {req.num_prompt_tokens} tokens; {slot.name}'s context is "
                f"{slot.max_model_len} tokens",
                "prompt",
            )
        if total > slot.max_model_len:
            raise PromptTooLongError(
                f"{slot.name}'s context is {slot.max_model_len} tokens, but {total} were asked "
                f"({req.num_prompt_tokens} in the prompt, {req.params.max_tokens} to generate)",
                "max_tokens",
            )
        need = slot.layout.physical_blocks_for(total)
        ceiling = self.quota.ceiling(self.pool, slot.name)
        if need > ceiling:
            fits = ceiling // slot.layout.blocks_per_logical * slot.layout.tokens_per_block
            raise PromptTooLongError(
                f"{total} tokens of {slot.name} need {need} KV blocks; its share of the pool "
                f"holds {ceiling} blocks ({fits} tokens)",
                "max_tokens",
            )

    def check_queue(self, q: ModelQueue) -> None:
        """QueueFullError when the model's queue is at `max_waiting`, or when what waits would
        take longer than `max_queue_wait_s` at the model's recent rate; its `retry_after` is
        that wait."""
        slot, waiting = q.slot, len(q.waiting)
        wait = q.service.expected_wait(waiting, self.clock())
        if waiting >= slot.max_waiting:
            raise QueueFullError(
                f"{slot.name}: {waiting} requests already waiting", "model", retry_after_s(wait)
            )
        bound = slot.max_queue_wait_s
        if bound is not None and wait is not None and wait > bound:
            raise QueueFullError(
                f"{slot.name}: {waiting} requests already waiting, about {wait:.0f} s at its "
                f"recent rate; over its max_queue_wait_s ({bound:g} s)",
                "model",
                retry_after_s(wait),
            )
