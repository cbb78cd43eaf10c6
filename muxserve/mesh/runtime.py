"""What runs inside a mesh's process: build the engine, serve it, stop it on request.

The same code runs in a child process of `muxserve serve` (`python -m muxserve.mesh`) and
inside a Ray actor; only how the launch spec arrives and how readiness is reported differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from muxserve.config import MuxConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MeshLaunch:
    """Everything a mesh process needs: its name, its engine's config, the router's token."""

    mesh: str
    config: dict[str, Any]  # `MuxConfig.for_mesh(...)` dumped to JSON-able data
    token: str
    host: str = "127.0.0.1"  # where to listen for the router

    @classmethod
    def of(cls, config: MuxConfig, mesh: str, token: str, host: str = "127.0.0.1") -> MeshLaunch:
        """The launch of `mesh` of a plan; its engine sees the mesh's GPUs as cuda:0.."""
        sub = config.for_mesh(mesh)
        device = sub.engine.device
        if device.startswith("cuda"):  # CUDA_VISIBLE_DEVICES is the mesh's GPUs
            sub = sub.model_copy(
                update={"engine": sub.engine.model_copy(update={"device": "cuda"})}
            )
        return cls(mesh, sub.model_dump(mode="json"), token, host)

    def to_json(self) -> dict[str, Any]:
        return {"mesh": self.mesh, "config": self.config, "token": self.token, "host": self.host}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MeshLaunch:
        return cls(data["mesh"], data["config"], data["token"], data.get("host", "127.0.0.1"))


@dataclass(frozen=True)
class Endpoint:
    """Where a started mesh listens, and which process it is."""

    host: str
    port: int
    pid: int


async def run_mesh(
    launch: MeshLaunch, ready: Callable[[Endpoint], None], stop: asyncio.Event
) -> None:
    """Load the mesh's models, listen, call `ready`, and serve until `stop` is set.

    Raises whatever loading raises (a bad checkpoint, not enough memory) before `ready`.
    """
    import os

    from muxserve.config import MuxConfig
    from muxserve.engine import MuxEngine
    from muxserve.mesh.server import MeshServer

    config = MuxConfig.model_validate(launch.config)
    engine = await asyncio.to_thread(MuxEngine, config)
    server = MeshServer(launch.mesh, engine, launch.token)
    try:
        engine.start()
        host, port = await server.listen(launch.host)
        log.info("mesh %s: serving %s on %s:%d", launch.mesh, ", ".join(engine.models), host, port)
        ready(Endpoint(host, port, os.getpid()))
        await stop.wait()
        log.info("mesh %s: stopping", launch.mesh)
    finally:
        with contextlib.suppress(Exception):
            await server.close()
        await asyncio.to_thread(engine.shutdown)
