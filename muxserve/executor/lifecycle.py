"""When a model's worker processes run: from the engine's start, or from its first job until
it has been idle a while.

With many models per mesh, most of them idle most of the time, eager workers cost two
processes per model (prefill and decode), each with its own torch import (and, on a GPU, its
own CUDA context), whether the model is asked for or not. Lazy workers start at a model's first
job (that job waits for them: about the time of a torch import); idle ones stop, and start
again at the next job. Weights stay loaded in the engine either way: only processes come and go.
Pooled workers (`engine.worker_pool: shared`) run several models each, so the process count
stops growing with the model count; lazy start and idle stop apply to them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerLifecycle:
    """`lazy`: start a (model, phase)'s workers at its first job, not with the engine.
    `idle_stop_s`: stop workers that have had no job this long (None: never).
    `pooled`: tp=1 models share one worker per (phase, SM-share class) instead of two each
    (`engine.worker_pool: shared`, worker_pool.py)."""

    lazy: bool = False
    idle_stop_s: float | None = None
    pooled: bool = False

    def __post_init__(self) -> None:
        if self.idle_stop_s is not None and self.idle_stop_s <= 0:
            raise ValueError(f"idle_stop_s must be positive, got {self.idle_stop_s}")

    def idle_expired(self, idle_since: float, now: float) -> bool:
        """Whether workers idle since `idle_since` should stop at `now`."""
        return self.idle_stop_s is not None and now - idle_since >= self.idle_stop_s
