"""An engine's models between awake and asleep: sleep, wake, waking for requests, and the
residency policy's choices under a weights budget (docs/elastic.md).

The engine owns one `ModelResidency`; it shares the engine's lock, since a model's state changes
with its scheduler queue (a sleep needs the queue empty; a wake needs the model's quota back).
Weights move outside the lock, in the caller's thread (or a waker thread for requests), so
the engine loop keeps running the other models' jobs meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from muxserve.errors import (
    InsufficientMemoryError,
    ModelBusyError,
    ModelDoesNotFitError,
    UnknownModelError,
)
from muxserve.executor.base import ModelSpec
from muxserve.request import FinishReason
from muxserve.residency import (
    WAKE_BUCKETS,
    ModelState,
    ResidencyPolicy,
    ResidencySettings,
    WakeStats,
)

if TYPE_CHECKING:
    from muxserve.engine import MuxEngine

log = logging.getLogger(__name__)


def check_budget(specs: Sequence[ModelSpec], budget: int | None) -> None:
    """The models that start awake must fit the weights budget: fail before loading."""
    if budget is None:
        return
    awake = {s.name: s.estimated_weight_bytes() for s in specs if not s.asleep}
    if sum(awake.values()) > budget:
        listed = ", ".join(f"{n} {b / (1 << 20):.1f} MiB" for n, b in awake.items())
        raise InsufficientMemoryError(
            f"the models that start awake need {sum(awake.values()) / (1 << 20):.1f} MiB "
            f"of weights ({listed}); engine.residency.weights_budget_bytes is "
            f"{budget / (1 << 20):.1f} MiB: start some with initial_state: asleep"
        )


class ModelResidency:
    """Which of an engine's models are awake, and the moves between awake and asleep."""

    def __init__(self, engine: MuxEngine, asleep: Sequence[str]) -> None:
        self.engine = engine
        self._lock = engine._lock  # the engine's: states change with its scheduler's queues
        self._budget = engine.config.engine.residency.weights_budget_bytes
        res = engine.config.engine.residency
        self._states = {
            n: ModelState.ASLEEP if n in asleep else ModelState.AWAKE for n in self.engine.models
        }
        self._sleep_level = dict.fromkeys(asleep, 2)  # of each asleep model
        self._wake_stats = {n: WakeStats() for n in self.engine.models}
        self._last_wake_s = dict.fromkeys(self.engine.models, 0.0)
        self._changed = threading.Condition(self._lock)  # a state changed, a request ended
        self._policy = ResidencyPolicy(
            {m.name: m.rate for m in self.engine.config.models},
            ResidencySettings(res.half_life_s, res.min_residency_s, res.idle_sleep_s),
            awake=[n for n in self.engine.models if n not in asleep],
        )
        self._wakers: dict[str, threading.Thread] = {}
        self._stopping = False

    def states(self) -> dict[str, ModelState]:
        """Every model's state now; any thread."""
        with self._lock:
            return dict(self._states)

    def wake_stats(self) -> dict[str, WakeStats]:
        with self._lock:
            return dict(self._wake_stats)

    # ---- the engine's hooks (under its lock) ----------------------------------------------
    def admit(self, model: str) -> None:
        """Before a request for `model` is queued: refuse it if the model can never wake."""
        if self._states[model] is not ModelState.AWAKE:
            self._check_ever_fits(model)

    def on_request(self, model: str) -> None:
        """A request for `model` was queued: count its demand; wake it if it is asleep."""
        self._policy.on_request(model)
        if self._states[model] is ModelState.ASLEEP:
            self._start_waker(model)

    def on_finished(self) -> None:
        """A request ended: a model may be idle now, so a wake waiting for room may evict it."""
        self._changed.notify_all()

    def start(self) -> None:
        """With `idle_sleep_s`: a thread that puts models idle that long to sleep."""
        if self.engine.config.engine.residency.idle_sleep_s is None:
            return
        if not self.engine.executor.can_sleep:
            return
        t = threading.Thread(target=self._sleep_idle, name="muxserve-idle", daemon=True)
        self._wakers[""] = t  # joined with the wakers
        t.start()

    def stop(self) -> None:
        """No more wakes; wait (bounded) for those under way."""
        self._stop_wakers()

    def add(self, model: str, rate: float) -> None:
        """Under the lock: a model joined, asleep and not loaded (level 2)."""
        self._states[model] = ModelState.ASLEEP
        self._sleep_level[model] = 2
        self._wake_stats[model] = WakeStats()
        self._last_wake_s[model] = 0.0
        self._policy.add(model, rate)

    def forget(self, model: str) -> None:
        """Under the lock: a model left (asleep, no requests: the caller checked)."""
        for d in (self._states, self._sleep_level, self._wake_stats, self._last_wake_s):
            d.pop(model, None)
        self._policy.forget(model)

    def state(self, model: str) -> ModelState:
        """Under the lock: `model`'s state, once it is not half-way (waking, sleeping)."""
        return self._settle(model)

    def _known(self, model: str) -> None:
        if model not in self.engine.models:
            raise UnknownModelError(model, list(self.engine.models))

    def _check_can_sleep(self) -> None:
        if not self.engine.executor.can_sleep:
            raise ValueError(
                f"sleep and wake need engine.executor: inline (this engine runs "
                f"{self.engine.config.engine.executor!r}, whose workers cannot sleep yet)"
            )

    def sleep(self, model: str, level: int = 1) -> None:
        """Put `model` to sleep (see `EngineClient.sleep`); blocks while its weights move, so
        call it off the event loop. Raises ModelBusyError while it has requests in flight."""
        self._known(model)
        self._check_can_sleep()
        if level not in (1, 2):
            raise ValueError(
                f"sleep level must be 1 (weights to host memory) or 2 (dropped), got {level!r}"
            )
        with self._lock:
            self._settle(model)
            if self._states[model] is ModelState.ASLEEP:
                if level == 2 and self._sleep_level.get(model) == 1:
                    self.engine.executor.sleep_model(model, 2)  # drop the host copy
                    self._sleep_level[model] = 2
                return
            busy = self.engine.scheduler.in_flight(model)
            if busy:
                raise ModelBusyError(model, busy)
            self._begin_sleep(model)
        self._finish_sleep(model, level)

    def wake(self, model: str) -> float:
        """Wake `model` (see `EngineClient.wake`); returns the seconds its weights took to come
        back (for a wake under way in another thread: that one's). Blocks while they move (call
        it off the event loop); other models keep running. Puts idle models to sleep to make
        room where the residency policy allows; raises ModelDoesNotFitError where it does not."""
        self._known(model)
        with self._lock:
            joined = self._states[model] is ModelState.WAKING  # another thread's wake
            if self._settle(model) is ModelState.AWAKE:
                return self._last_wake_s[model] if joined else 0.0
            self._check_can_sleep()
            victims = self._make_room(model)
            for v in victims:
                self._begin_sleep(v)
            self._states[model] = ModelState.WAKING
            self._changed.notify_all()
        level = self.engine.config.engine.residency.sleep_level
        try:
            for v in victims:
                log.info("%s: put to sleep (level %d) to make room for %s", v, level, model)
                self._finish_sleep(v, level)
            t0 = time.perf_counter()
            self.engine.executor.wake_model(model)
            took = time.perf_counter() - t0
        except (torch.cuda.OutOfMemoryError, MemoryError) as e:
            # the budget's view was wrong (another process took memory): a clear 503, not a crash
            with self._lock:
                self._states[model] = ModelState.ASLEEP
                self._changed.notify_all()
                held = self._held()
                free = self._free_bytes(held)
                need = self.engine.executor.weight_bytes(model)
            log.warning("%s: out of memory while waking: %s", model, e)
            raise ModelDoesNotFitError(model, need, max(free or 0, 0), held) from e
        except BaseException:
            with self._lock:
                self._states[model] = ModelState.ASLEEP
                self._changed.notify_all()
            raise
        with self._lock:
            self._woke(model, took)
        self.engine.executor.wake()  # the loop may start the model's jobs now
        return took

    def _settle(self, model: str) -> ModelState:
        """Wait (under the lock) until `model` is not half-way (waking, sleeping)."""
        deadline = time.monotonic() + self.engine.config.engine.residency.wake_timeout_s
        while self._states[model] in (ModelState.WAKING, ModelState.SLEEPING):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{model}: still {self._states[model].value} after waiting")
            self._changed.wait(left)
        return self._states[model]

    def _begin_sleep(self, model: str) -> None:
        """Under the lock: no more jobs for `model`; its quota goes back to the pool."""
        self._states[model] = ModelState.SLEEPING
        self.engine.scheduler.sleep_model(model)
        self._policy.on_asleep(model)
        self._changed.notify_all()

    def _finish_sleep(self, model: str, level: int) -> None:
        """Outside the lock: move the weights off the device, then mark `model` asleep."""
        self.engine.executor.sleep_model(model, level)
        with self._lock:
            self._states[model] = ModelState.ASLEEP
            self._sleep_level[model] = level
            st = self._wake_stats[model]
            self._wake_stats[model] = replace(st, sleeps=st.sleeps + 1)
            self._changed.notify_all()
            if self.engine.scheduler.queues[model].waiting:  # requests came while it was sleeping
                self._start_waker(model)

    def _woke(self, model: str, took: float) -> None:
        """Under the lock: `model` is awake; its waiting requests learn how long they waited."""
        self.engine.scheduler.wake_model(model)
        self._states[model] = ModelState.AWAKE
        self._sleep_level.pop(model, None)
        self._policy.on_awake(model)
        self._last_wake_s[model] = took
        self._wake_stats[model] = _add_wake(self._wake_stats[model], took)
        now = time.monotonic()
        for req in self.engine.scheduler.queues[model].waiting:
            req.wake_time = now - req.arrival_time
        self._changed.notify_all()
        self.engine._wake.notify()

    def _held(self) -> dict[str, int]:
        """Device bytes each model's weights hold now (awake, or on their way in or out)."""
        return {
            n: self.engine.executor.weight_bytes(n)
            for n, st in self._states.items()
            if st is not ModelState.ASLEEP
        }

    def _free_bytes(self, held: dict[str, int]) -> int | None:
        """Bytes free for weights; None: no limit (a CPU without a budget)."""
        if self._budget is not None:
            return self._budget - sum(held.values())
        if self.engine.device.type == "cuda":
            device = self.engine.device
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return int(torch.cuda.mem_get_info(device)[0]) + cached  # ours, not in use
        return None

    def _busy(self) -> set[str]:
        return {n for n in self.engine.models if self.engine.scheduler.in_flight(n)}

    def _make_room(self, model: str) -> list[str]:
        """Under the lock: the idle models to put to sleep so that `model` fits (the residency
        policy's choice), or ModelDoesNotFitError."""
        held = self._held()
        held.pop(model, None)
        free = self._free_bytes(held)
        need = self.engine.executor.weight_bytes(model)
        if free is None:
            return []
        victims = self._policy.make_room(need, free, held, self._busy())
        if victims is None:
            raise ModelDoesNotFitError(model, need, max(free, 0), held)
        return victims

    def _check_ever_fits(self, model: str) -> None:
        """A request for a sleeping model whose weights exceed the whole budget: refuse it now
        rather than let it wait for room that never comes."""
        if self._budget is None:
            return
        need = self.engine.executor.weight_bytes(model)
        if need > self._budget:
            raise ModelDoesNotFitError(model, need, self._budget, {})

    # ---- waking for requests -------------------------------------------------------------
    def _start_waker(self, model: str) -> None:
        """Under the lock: wake `model` in a thread of its own, for the requests that wait."""
        t = self._wakers.get(model)
        if self._stopping or (t is not None and t.is_alive()):
            return
        t = threading.Thread(
            target=self._wake_for_requests,
            args=(model,),
            name=f"muxserve-wake-{model}",
            daemon=True,
        )
        self._wakers[model] = t
        t.start()

    def _wake_for_requests(self, model: str) -> None:
        """Wake `model`; while it does not fit, wait for a model to go idle (or pass its
        minimum residency) and try again, up to `wake_timeout_s`; then its waiting requests
        end with the reason."""
        deadline = time.monotonic() + self.engine.config.engine.residency.wake_timeout_s
        while True:
            with self._lock:
                if self._stopping or not self.engine.scheduler.queues[model].waiting:
                    return  # nobody waits any more
            try:
                self.wake(model)
                return
            except ModelDoesNotFitError as e:
                with self._lock:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        waited = self.engine.config.engine.residency.wake_timeout_s
                        self._fail_waiting(model, f"{e} (waited {waited:g} s for room)")
                        return
                    nxt = self._policy.next_eviction_in(self._busy())
                    self._changed.wait(min(left, nxt if nxt is not None else left))
            except Exception as e:  # a broken checkpoint, no memory: its requests fail
                log.exception("%s: waking it failed", model)
                with self._lock:
                    self._fail_waiting(model, f"waking {model} failed: {type(e).__name__}: {e}")
                return

    def _sleep_idle(self) -> None:
        """Put models idle for `idle_sleep_s` to sleep, without memory pressure (start())."""
        res = self.engine.config.engine.residency
        assert res.idle_sleep_s is not None
        while True:
            with self._lock:
                self._changed.wait(res.idle_sleep_s / 4)
                if self._stopping:
                    return
                idle = [
                    m
                    for m in self._policy.idle_too_long(self._busy())
                    if self._states[m] is ModelState.AWAKE
                ]
            for m in idle:
                log.info("%s: idle for %g s, put to sleep", m, res.idle_sleep_s)
                with contextlib.suppress(ModelBusyError, TimeoutError):  # a request came
                    self.sleep(m, res.sleep_level)

    def _fail_waiting(self, model: str, error: str) -> None:
        """Under the lock: end every waiting request of `model` with `error`."""
        for req in list(self.engine.scheduler.queues[model].waiting):
            self.engine.scheduler.finish(req.request_id, FinishReason.ERROR)
            self.engine._emit(req, error)
        self.engine._wake.notify()  # a step waiting for the wake returns

    def _stop_wakers(self) -> None:
        with self._lock:
            self._stopping = True
            self._changed.notify_all()
        for t in list(self._wakers.values()):
            t.join(timeout=self.engine.config.engine.residency.wake_timeout_s)


def _add_wake(st: WakeStats, took: float) -> WakeStats:
    buckets = st.wake_buckets or (0,) * len(WAKE_BUCKETS)
    return replace(
        st,
        wakes=st.wakes + 1,
        wake_seconds=st.wake_seconds + took,
        wake_buckets=tuple(b + (took <= le) for b, le in zip(buckets, WAKE_BUCKETS, strict=True)),
    )
