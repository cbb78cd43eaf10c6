"""Re-planning while serving: the planner re-run on the rates the router measures.

Every `interval_s`, or sooner when a model's rate drifts more than `drift` (relative, against
`rate_floor`) from what the current plan was made for, the `Replanner` snapshots the
router's `WorkloadWindow` and asks its `Planner` (off the event loop, in a thread) for a
proposal: which meshes each model should be active on. The planner comes from above (the
router does not import the planner): `placement/replanning.py`'s `PlacementPlanner` runs the
placement planner (`placement.algorithms.solve`, the greedy, with a short time limit) on the
observed workload and fits its plan onto the plan's fixed meshes; it also searches from the current
placement (warm start: one model moved at a time while that pays more); of the two it takes
the one that pays most, and keeps the current placement unless the gain pays for the moves
(`placement.migration.decide`: gain x horizon > load time x the destination's served rate,
summed over moves). A proposal that moves models is applied model
by model with `Router.move` (wake, switch, drain, sleep), so no request fails.

Unless `add_models` is set, a model can only move to a mesh that lists it. A plan lists a
standby model on a mesh by giving that mesh's entry for it `initial_state: asleep`
(`muxserve/router/routing.py`): not loaded, and sent no requests, until a move wakes it
there. For example, mistral served on mesh-a and ready to move to mesh-b:

    meshes:
      - {name: mesh-a, gpus: [0], models: [{name: llama}, {name: mistral}]}
      - {name: mesh-b, gpus: [1], models: [{name: qwen}, {name: mistral, initial_state: asleep}]}

The planner's choices that need a mesh which does not list the model are left out, and said
so in the change's notes. With `add_models`, meshes change shape: the planner may move a
model to any mesh that can hold it, and `Router.move` adds it there (and removes it from the
mesh it leaves).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from muxserve.config import ReplanConfig
from muxserve.router.observed import ObservedLoad, drift

if TYPE_CHECKING:
    from muxserve.router.router import Router
    from placement.migration import Decision

log = logging.getLogger(__name__)

Assignment = Mapping[str, Sequence[str]]  # model -> the meshes it is active on


@dataclass(frozen=True)
class Proposal:
    """What a planner would do, and the numbers behind it."""

    target: dict[str, tuple[str, ...]]  # model -> meshes it should be active on
    decision: Decision
    rates: dict[str, float]  # the observed rates it planned for
    notes: tuple[str, ...] = ()


class Planner(Protocol):
    def propose(self, loads: Mapping[str, ObservedLoad], active: Assignment) -> Proposal | None:
        """A proposal for the observed `loads` given what is `active` now; None: no plan."""
        ...


@dataclass(frozen=True)
class Change:
    """One re-planning round, as logged."""

    at: float  # the clock's time
    reason: str  # "interval" or "drift ..."
    rates_before: dict[str, float]  # what the plan in force was made for
    rates_after: dict[str, float]  # what was observed
    decision: Decision | None
    moves: tuple[tuple[str, str | None, str | None], ...] = ()  # (model, from, to) applied
    notes: tuple[str, ...] = ()
    failed: tuple[str, ...] = field(default=())  # moves that could not be made, and why


class Replanner:
    """Watches the router's measured rates and re-plans when due (see the module)."""

    def __init__(
        self,
        router: Router,
        settings: ReplanConfig,
        planner: Planner,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.router = router
        self.settings = settings
        self._planner = planner
        self._clock = clock
        self.planned_rates = {m.name: m.rate for m in router.config.models}
        self.last = clock()
        self.history: list[Change] = []
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    @property
    def planner(self) -> Planner:
        return self._planner

    def start(self) -> None:
        """Start watching (the interval counts from now: the meshes have just started)."""
        self.last = self._clock()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.check_s)  # a timer: re-planning is periodic
            reason = self.due()
            if reason is not None:
                try:
                    await self.replan(reason)
                except Exception:  # a planner bug must not stop serving
                    log.exception("re-planning failed; the plan stays as it is")

    def observed_rates(self) -> dict[str, float]:
        loads = self.router.window.snapshot(self.router.routing.models)
        return {m: round(load.rate, 4) for m, load in loads.items()}

    def due(self) -> str | None:
        """Why to re-plan now ("interval" or "drift ..."), or None."""
        if self._clock() - self.last >= self.settings.interval_s:
            return "interval"
        d = drift(self.planned_rates, self.observed_rates(), self.settings.rate_floor)
        if d > self.settings.drift:
            return f"drift {d:.0%} > {self.settings.drift:.0%}"
        return None

    async def replan(self, reason: str) -> Change:
        """One round: plan on the window (in a thread), log it, apply the moves if it pays."""
        async with self._lock:
            loads = self.router.window.snapshot(self.router.routing.models)
            active = self.router.routing.assignment()
            planner = self.planner
            proposal = await asyncio.to_thread(planner.propose, loads, active)
            before = dict(self.planned_rates)
            self.last = self._clock()
            after = {m: round(load.rate, 4) for m, load in loads.items()}
            self.planned_rates = after
            if proposal is None:
                change = Change(self.last, reason, before, after, None)
                self.history.append(change)
                return change
            d = proposal.decision
            log.info(
                "re-planning (%s): rates %s -> %s; %s",
                reason,
                _rates(before),
                _rates(after),
                d.reason(),
            )
            for note in proposal.notes:
                log.info("re-planning: %s", note)
            moves: list[tuple[str, str | None, str | None]] = []
            failed: list[str] = []
            if d.take:
                moves, failed = await self.apply(proposal.target, active, reason, d)
            change = Change(
                self.last, reason, before, after, d, tuple(moves), proposal.notes, tuple(failed)
            )
            self.history.append(change)
            return change

    async def apply(
        self,
        target: Mapping[str, Sequence[str]],
        active: Assignment,
        reason: str,
        decision: Decision,
    ) -> tuple[list[tuple[str, str | None, str | None]], list[str]]:
        """Move every model whose meshes change; models move concurrently, each one by one
        (wakes before drains, so a model always has somewhere to go)."""
        why = f"{reason}; {decision.reason()}"
        plan: dict[str, list[tuple[str | None, str | None]]] = {}
        for model, dsts in target.items():
            now = list(active.get(model, ()))
            add = [m for m in dsts if m not in now]
            drop = [m for m in now if m not in dsts]
            pairs: list[tuple[str | None, str | None]] = list(
                itertools.zip_longest(drop, add, fillvalue=None)
            )
            # unpaired drops go last (after every wake), unpaired adds first
            pairs.sort(key=lambda p: (p[1] is None, p[0] is not None))
            if pairs:
                plan[model] = pairs

        async def one(model: str) -> tuple[list[tuple[str, str | None, str | None]], list[str]]:
            done: list[tuple[str, str | None, str | None]] = []
            for src, dst in plan[model]:
                try:
                    await self.router.move(model, src, dst, why)
                except Exception as e:  # the model stays where it is; the others go on
                    log.error("moving %s %s -> %s failed: %s", model, src, dst, e)
                    return done, [f"{model} {src} -> {dst}: {e}"]
                done.append((model, src, dst))
            return done, []

        results = await asyncio.gather(*(one(m) for m in plan))
        moves = [mv for done, _ in results for mv in done]
        failed = [f for _, fs in results for f in fs]
        return moves, failed


def _rates(rates: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{m}: {r:g}" for m, r in sorted(rates.items())) + "}"
