"""`RoutingTable`: the one place that says where each model takes new requests.

A plan's mesh lists the models it may serve; each listing is *active* (taking new requests:
the default) or *standby*: the mesh's own entry for the model says `initial_state: asleep`
(not loaded, and no requests, until re-planning moves the model there). A model entry's
`initial_state: asleep` only says the model is not loaded at start: its listings stay active,
and its first request wakes it. New requests for a model go to its active meshes; a model
with none (every listing standby) goes to any listing, which wakes it on demand. The table
also counts each (mesh, model)'s requests in flight, so that moving a model can wait for its
old mesh to drain. A model added to a mesh while serving (a mesh that changes shape) is
listed there from then on, and unlisted when it is removed (`list_added`, `unlist`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

from muxserve.config import Mesh


class RoutingTable:
    """Listed and active meshes per model, and requests in flight per (mesh, model)."""

    def __init__(self, meshes: Iterable[Mesh]) -> None:
        self._listed: dict[str, list[str]] = {}
        self._active: dict[str, list[str]] = {}
        for mesh in meshes:
            for mm in mesh.models:
                self._listed.setdefault(mm.name, []).append(mesh.name)
                self._active.setdefault(mm.name, [])
                if mm.initial_state != "asleep":  # the mesh's entry: standby or not
                    self._active[mm.name].append(mesh.name)
        self._added: set[tuple[str, str]] = set()  # (mesh, model) listed while serving
        self._inflight: dict[tuple[str, str], int] = {}
        self._drained: dict[tuple[str, str], asyncio.Event] = {}

    # ---- where ------------------------------------------------------------------------------
    @property
    def models(self) -> list[str]:
        return list(self._listed)

    def listed(self, model: str) -> list[str]:
        """Meshes that may serve `model` (KeyError for a model no mesh lists)."""
        return list(self._listed[model])

    def active(self, model: str) -> list[str]:
        """Meshes taking new requests for `model` now."""
        return list(self._active[model])

    def targets(self, model: str) -> list[str]:
        """Where a new request for `model` may go: its active meshes, else every listing."""
        return self.active(model) or self.listed(model)

    def assignment(self) -> dict[str, tuple[str, ...]]:
        """Every model's active meshes."""
        return {m: tuple(a) for m, a in self._active.items()}

    def activate(self, model: str, mesh: str) -> None:
        """`mesh` takes new requests for `model` (it must list it)."""
        if mesh not in self._listed.get(model, []):
            raise ValueError(f"mesh {mesh!r} does not list model {model!r}: it cannot serve it")
        if mesh not in self._active[model]:
            self._active[model].append(mesh)

    def deactivate(self, model: str, mesh: str) -> None:
        """`mesh` takes no new requests for `model`; those in flight there go on."""
        if mesh in self._active.get(model, []):
            self._active[model].remove(mesh)

    def list_added(self, model: str, mesh: str) -> None:
        """`mesh` serves `model` now, added while serving (not active until `activate`)."""
        if mesh in self._listed.get(model, []):
            raise ValueError(f"mesh {mesh!r} lists model {model!r} already")
        self._listed.setdefault(model, []).append(mesh)
        self._active.setdefault(model, [])
        self._added.add((mesh, model))

    def added(self, model: str, mesh: str) -> bool:
        """Whether `model` was added to `mesh` while serving (not listed there by the plan)."""
        return (mesh, model) in self._added

    def added_on(self, mesh: str) -> list[str]:
        """The models added to `mesh` while serving."""
        return [m for (me, m) in self._added if me == mesh]

    def unlist(self, model: str, mesh: str) -> None:
        """`mesh` no longer serves `model` (it was removed there); it must not be active."""
        if mesh in self._active.get(model, []):
            raise ValueError(f"{model} is active on {mesh}: deactivate and drain it first")
        if mesh in self._listed.get(model, []):
            self._listed[model].remove(mesh)
        self._added.discard((mesh, model))

    # ---- in flight --------------------------------------------------------------------------
    def begin(self, mesh: str, model: str) -> None:
        key = (mesh, model)
        self._inflight[key] = self._inflight.get(key, 0) + 1
        event = self._drained.get(key)
        if event is not None:
            event.clear()

    def end(self, mesh: str, model: str) -> None:
        key = (mesh, model)
        left = self._inflight.get(key, 0) - 1
        if left < 0:
            raise RuntimeError(f"{model} on {mesh}: more requests ended than began")
        self._inflight[key] = left
        if left == 0 and key in self._drained:
            self._drained[key].set()

    def inflight(self) -> Mapping[tuple[str, str], int]:
        """Requests in flight per (mesh, model), where any are."""
        return {k: n for k, n in self._inflight.items() if n}

    async def drained(self, mesh: str, model: str, timeout: float) -> bool:
        """Wait until `model` has no request in flight on `mesh`; False after `timeout` s."""
        key = (mesh, model)
        if not self._inflight.get(key):
            return True
        event = self._drained.setdefault(key, asyncio.Event())
        event.clear()
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True
