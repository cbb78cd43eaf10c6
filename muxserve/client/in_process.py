"""`InProcessClient`: the `EngineClient` over a `MuxEngine` in this process (no plan)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Mapping

from muxserve.client.protocol import Health, MeshHealth, MeshState, MeshStats, ModelState
from muxserve.engine import MuxEngine
from muxserve.output_processor import RequestOutput
from muxserve.sampling_params import SamplingParams
from muxserve.served_model import ServedModel

LOCAL_MESH = "local"  # the mesh label of the one engine of a config without a plan


class InProcessClient:
    """Serves from one engine whose loop runs in a thread of this process.

    With `manage` the client starts the engine's loop and shuts it down; without, the caller
    does (tests share one engine between apps).
    """

    def __init__(self, engine: MuxEngine, *, name: str = LOCAL_MESH, manage: bool = True) -> None:
        self.engine = engine
        self.name = name
        self.manage = manage

    @property
    def models(self) -> Mapping[str, ServedModel]:
        return self.engine.models

    async def start(self) -> None:
        if self.manage:
            self.engine.start()

    async def add_request(
        self, model: str, prompt: list[int], params: SamplingParams, request_id: str
    ) -> str:
        if params.structured is not None:  # compiling a grammar may take a while: not here
            return await asyncio.to_thread(
                self.engine.add_request, model, prompt, params, request_id
            )
        return self.engine.add_request(model, prompt, params, request_id)

    def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        return self.engine.stream(request_id)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    async def stats(self) -> list[MeshStats]:
        return [mesh_stats(self.engine, self.name)]

    async def sleep(self, model: str, level: int = 1) -> None:
        await asyncio.to_thread(self.engine.sleep, model, level)

    async def wake(self, model: str) -> float:
        return await asyncio.to_thread(self.engine.wake, model)

    def model_states(self) -> dict[str, ModelState]:
        return self.engine.model_states()

    def health(self) -> Health:
        state = MeshState.OK if self.engine.is_running else MeshState.STOPPED
        error = None if state is MeshState.OK else "the engine loop is not running"
        mesh = MeshHealth(
            state,
            tuple(self.engine.models),
            os.getpid(),
            socket.gethostname(),
            error=error,
            degraded=self.engine.degraded(),
        )
        return Health({self.name: mesh})

    async def shutdown(self) -> None:
        if self.manage:
            await asyncio.to_thread(self.engine.shutdown)


def mesh_stats(engine: MuxEngine, name: str) -> MeshStats:
    """A snapshot of `engine`'s scheduler, labelled as mesh `name`."""
    snap = engine.snapshot()
    return MeshStats(
        name,
        snap.models,
        snap.blocks_total,
        snap.blocks_free,
        snap.preemptions,
        engine.model_states(),
        engine.wake_stats(),
    )
