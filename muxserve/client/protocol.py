"""The seam between the HTTP layer and the engines: `EngineClient`, and what it reports.

The server only ever holds an `EngineClient`: one engine in this process (`InProcessClient`),
one mesh engine in another process (`RemoteEngineClient`), or a router over many meshes
(`Router`). Stats and health come through it, so `/metrics` and `/health` read the same way
whichever is behind it.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from muxserve.output_processor import RequestOutput
from muxserve.residency import ModelState, WakeStats
from muxserve.sampling_params import SamplingParams
from muxserve.scheduler.scheduler import ModelStats
from muxserve.served_model import ServedModel


@dataclass(frozen=True)
class MeshStats:
    """One engine's scheduler state at one moment, for metrics."""

    mesh: str
    models: dict[str, ModelStats]
    blocks_total: int  # KV blocks of the engine's pool
    blocks_free: int
    preemptions: int = 0  # since the engine started
    states: dict[str, ModelState] = field(default_factory=dict)  # every model's, at that moment
    wakes: dict[str, WakeStats] = field(default_factory=dict)  # per model


class MeshState(enum.Enum):
    """Where a mesh engine is in its life, as the router sees it."""

    STARTING = "starting"  # launched, still loading its models
    OK = "ok"  # serving
    DOWN = "down"  # died or lost; a restart is pending
    STOPPED = "stopped"  # shut down on purpose, or gave up restarting


@dataclass(frozen=True)
class MeshHealth:
    """One mesh in `/health`."""

    state: MeshState
    models: tuple[str, ...]
    pid: int | None = None  # of the engine's process, when known
    node: str | None = None  # the host (or Ray node) it runs on
    restarts: int = 0  # times it was restarted after dying
    error: str | None = None  # why it is down, when it is
    degraded: dict[str, str] = field(default_factory=dict)  # models not serving now, and why
    resubmitted: int = 0  # requests it lost before any output that another replica took

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "status": self.state.value,
            "pid": self.pid,
            "node": self.node,
            "models": list(self.models),
            "restarts": self.restarts,
            "resubmitted": self.resubmitted,
        }
        if self.error is not None:
            out["error"] = self.error
        if self.degraded:
            out["degraded_models"] = dict(self.degraded)
        return out


@dataclass(frozen=True)
class Health:
    """The whole server's health: every mesh, and whether anything is served at all."""

    meshes: dict[str, MeshHealth] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """ "ok": every mesh serves every model; "degraded": some serve; "down": none does."""
        up = [m.state is MeshState.OK for m in self.meshes.values()]
        if up and all(up) and not any(m.degraded for m in self.meshes.values()):
            return "ok"
        return "degraded" if any(up) else "down"

    def to_json(self) -> dict[str, object]:
        return {
            "status": self.status,
            "meshes": {name: m.to_json() for name, m in self.meshes.items()},
        }


class EngineClient(Protocol):
    """What the HTTP layer needs of whatever runs the models.

    Only the event loop's thread calls these. `add_request` raises a `RequestError` subclass
    for a request that cannot be served as asked (nothing is allocated for it), and
    `MeshUnavailableError` when the engine serving the model is down.
    """

    @property
    def models(self) -> Mapping[str, ServedModel]:
        """Every served model by name, with its tokenizer and limits."""
        ...

    async def start(self) -> None:
        """Start serving; returns once every model can take requests (or raises)."""
        ...

    async def add_request(
        self, model: str, prompt: list[int], params: SamplingParams, request_id: str
    ) -> str:
        """Queue a tokenized prompt; returns `request_id` once the engine has accepted it."""
        ...

    def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """The request's outputs as they come; the last has `finished` set.

        Raises `MeshUnavailableError` if its engine dies before the end, and KeyError for a
        request it does not know (never added, aborted, or already read to the end).
        """
        ...

    def abort(self, request_id: str) -> None:
        """Stop a request and free what it holds; unknown or finished ids are ignored."""
        ...

    async def stats(self) -> list[MeshStats]:
        """Scheduler state of every engine that answers (one per mesh)."""
        ...

    async def sleep(self, model: str, level: int = 1) -> None:
        """Put `model` to sleep: its KV quota goes back to the pool, its device weights go.

        Level 1 keeps the weights in host memory (pinned on a GPU) for a fast wake; level 2
        drops them (a wake reloads the checkpoint). Asleep already: nothing happens. Raises
        `UnknownModelError`, `ValueError` for another level, and `ModelBusyError` while the
        model has requests waiting or running (drain it first).
        """
        ...

    async def wake(self, model: str) -> float:
        """Bring `model`'s weights back; returns the seconds it took (0.0: awake already).

        Raises `UnknownModelError`, and `ModelDoesNotFitError` when its weights do not fit in
        what the awake models leave (after the residency policy put idle ones to sleep).
        """
        ...

    def model_states(self) -> dict[str, ModelState]:
        """Every model's state as last known, without waiting on any engine."""
        ...

    def health(self) -> Health:
        """Every mesh's state, without waiting on any engine."""
        ...

    async def shutdown(self) -> None:
        """Abort what is left and stop every engine; idempotent."""
        ...
