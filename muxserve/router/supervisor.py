"""`MeshSupervisor`: keeps one mesh serving — start, watch, restart with backoff, stop.

A mesh is down when its connection is lost (the process died: the socket closes at once) or
when it stops answering pings for `hang_timeout` s (the process hung: it is killed first).
While down its models answer 503 naming the mesh; the other meshes are not touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from muxserve.client.protocol import MeshHealth, MeshState
from muxserve.config import Mesh, RouterConfig
from muxserve.mesh.remote_client import RemoteEngineClient
from muxserve.router.mesh_process import START_TIMEOUT_S, STOP_TIMEOUT_S, MeshProcess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SupervisionSettings:
    """How meshes are watched and brought back."""

    start_timeout: float = START_TIMEOUT_S
    stop_timeout: float = STOP_TIMEOUT_S
    ping_interval: float = 1.0  # seconds between liveness pings
    hang_timeout: float = 30.0  # no answer for this long: the mesh is killed and restarted
    backoff_initial: float = 0.5  # first restart delay; doubled after each failed restart
    backoff_max: float = 30.0
    stable_after: float = 60.0  # up this long: the next failure starts the backoff again

    @classmethod
    def of(cls, config: RouterConfig) -> SupervisionSettings:
        return cls(
            start_timeout=config.start_timeout_s,
            ping_interval=config.ping_interval_s,
            hang_timeout=config.hang_timeout_s,
            backoff_initial=config.backoff_initial_s,
            backoff_max=config.backoff_max_s,
        )


class MeshSupervisor:
    """One mesh: its process, the router's connection to it, and its state."""

    def __init__(
        self,
        mesh: Mesh,
        process: MeshProcess,
        client: RemoteEngineClient,
        settings: SupervisionSettings,
    ) -> None:
        self.mesh = mesh
        self.process = process
        self.client = client
        self.settings = settings
        self.state = MeshState.STARTING
        self.restarts = 0
        self.error: str | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._up_since = 0.0
        # after a restart: what the router re-does on the fresh process (models it added)
        self.on_back: Callable[[MeshSupervisor], Awaitable[None]] | None = None

    @property
    def name(self) -> str:
        return self.mesh.name

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.mesh.models)

    async def start(self) -> None:
        """Launch the mesh and connect; raises MeshStartError if it cannot serve."""
        endpoint = await asyncio.to_thread(self.process.start, self.settings.start_timeout)
        await self.client.connect(endpoint)
        self._serving()
        self._task = asyncio.create_task(self._watch(), name=f"supervise-{self.name}")

    def _serving(self) -> None:
        self.state, self.error = MeshState.OK, None
        self._up_since = time.monotonic()

    async def _watch(self) -> None:
        backoff = self.settings.backoff_initial
        while not self._stopping:
            await self._until_lost()
            if self._stopping:
                return
            self.state, self.error = MeshState.DOWN, self.client.lost_reason
            ended = await asyncio.to_thread(self.process.exit_reason, 1.0)
            if ended is not None:
                self.error = ended
            log.error("mesh %s is down (%s); restarting it", self.name, self.error)
            if time.monotonic() - self._up_since >= self.settings.stable_after:
                backoff = self.settings.backoff_initial
            while not self._stopping:
                await asyncio.sleep(backoff)  # the backoff itself, not a wait for an event
                backoff = min(backoff * 2, self.settings.backoff_max)
                try:
                    endpoint = await asyncio.to_thread(
                        self.process.restart, self.settings.start_timeout
                    )
                    await self.client.connect(endpoint)
                except Exception as e:
                    self.error = f"restart failed: {e}"
                    log.error("mesh %s: %s", self.name, self.error)
                    continue
                self.restarts += 1
                if self.on_back is not None:
                    try:
                        await self.on_back(self)
                    except Exception:  # the mesh serves its plan's models all the same
                        log.exception("mesh %s: restoring it after the restart failed", self.name)
                self._serving()
                log.info("mesh %s is back (restart %d)", self.name, self.restarts)
                break

    async def _until_lost(self) -> None:
        """Returns when the connection is lost; kills a mesh that stops answering pings."""
        s = self.settings
        lost = asyncio.create_task(self.client.wait_closed())
        try:
            last_answer = time.monotonic()
            while True:
                done, _ = await asyncio.wait({lost}, timeout=s.ping_interval)
                if done:
                    return
                with contextlib.suppress(Exception):
                    if await self.client.ping(timeout=s.ping_interval):
                        last_answer = time.monotonic()
                if time.monotonic() - last_answer > s.hang_timeout:
                    log.error(
                        "mesh %s: no answer (or no engine loop) for %.0f s; killing it",
                        self.name,
                        s.hang_timeout,
                    )
                    await asyncio.to_thread(self.process.kill)
                    await self.client.close()
                    self.client.lost_reason = f"it hung for {s.hang_timeout:.0f} s and was killed"
                    return
        finally:
            lost.cancel()

    def health(self) -> MeshHealth:
        return MeshHealth(
            self.state,
            self.models,
            self.process.pid,
            self.process.node,
            self.restarts,
            self.error,
            dict(self.client.degraded) if self.state is MeshState.OK else {},
        )

    async def stop(self) -> None:
        """Stop watching, then stop the process (it aborts its requests); idempotent."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.state = MeshState.STOPPED
        await asyncio.to_thread(self.process.stop, self.settings.stop_timeout)
        await self.client.close()
