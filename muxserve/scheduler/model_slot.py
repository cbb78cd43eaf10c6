"""What the scheduler knows of one served model, and its queues."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from muxserve.config import SMShare
from muxserve.kv.layout import KVLayout
from muxserve.request import Request
from muxserve.scheduler.job import Phase
from muxserve.scheduler.service_rate import ServiceRate


@dataclass(frozen=True)
class ModelSlot:
    """A served model as the scheduler sees it: no weights, just sizes and limits."""

    name: str
    layout: KVLayout
    max_model_len: int  # prompt + output tokens at most
    eos_token_ids: frozenset[int] = frozenset()
    rate: float = 1.0  # expected requests/s: weight of the initial KV quota
    sm_share: SMShare = field(default_factory=SMShare)
    max_waiting: int = 1024
    kv_share: float | None = None  # the plan's initial share of the pool; None: by weight
    max_queue_wait_s: float | None = None  # refuse past this expected wait; None: no bound


@dataclass(eq=False)
class ModelQueue:
    """Per-model scheduling state: waiting requests (FIFO) and admitted ones."""

    slot: ModelSlot
    waiting: deque[Request] = field(default_factory=deque)
    running: list[Request] = field(default_factory=list)  # admission order
    prefilling: list[Request] = field(default_factory=list)  # running, prefill not complete
    busy: set[Phase] = field(default_factory=set)  # phases with a job in flight
    service: ServiceRate = field(default_factory=ServiceRate)  # how fast requests leave
    preemptions: int = 0  # of its requests, since it joined

    @property
    def name(self) -> str:
        return self.slot.name

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def requeue(self, req: Request) -> None:
        """Put a preempted request back in arrival order, ahead of later arrivals."""
        i = 0
        while i < len(self.waiting) and self.waiting[i].arrival_time <= req.arrival_time:
            i += 1
        self.waiting.insert(i, req)
