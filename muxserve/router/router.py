"""`Router`: the `EngineClient` in front of every mesh of a plan.

A request goes to the mesh serving its model; where a model is on several meshes, to the
replica with the fewest outstanding requests. Tokenizing happens here, once; outputs are passed
on as each arrives. The router never waits on a mesh to answer `/health`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from pathlib import Path

from muxserve.client.protocol import Health, MeshState, MeshStats, ModelState
from muxserve.config import MuxConfig
from muxserve.errors import MeshStartError, MeshUnavailableError, UnknownModelError
from muxserve.mesh.remote_client import RemoteEngineClient
from muxserve.mesh.wire import new_token
from muxserve.models.hf_config import load_hf_config
from muxserve.output_processor import RequestOutput
from muxserve.router.mesh_process import LaunchContext, Launcher
from muxserve.router.supervisor import MeshSupervisor, SupervisionSettings
from muxserve.sampling_params import SamplingParams
from muxserve.served_model import ServedModel
from muxserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

STATS_TIMEOUT_S = 2.0  # a mesh slower than this to report is left out of a scrape


class Router:
    """Routes by model to the meshes of `config` (a plan), which `launcher` runs."""

    def __init__(
        self,
        config: MuxConfig,
        launcher: Launcher,
        settings: SupervisionSettings | None = None,
    ) -> None:
        if not config.meshes:
            raise ValueError("the router serves a plan: the config has no meshes")
        launcher.check(config)
        self.config = config
        ctx = LaunchContext(config, new_token())
        settings = settings or SupervisionSettings.of(config.router)
        self.meshes = {
            m.name: MeshSupervisor(
                m, launcher.process(ctx, m), RemoteEngineClient(m.name, ctx.token), settings
            )
            for m in config.meshes
        }
        self._replicas = {
            entry.name: [s for s in self.meshes.values() if entry.name in s.models]
            for entry in config.models
        }
        cap = config.engine.max_model_len
        self._models = {
            m.name: _served(m.name, m.path, m.dtype, m.max_model_len, cap) for m in config.models
        }
        self._owner: dict[str, RemoteEngineClient] = {}

    @property
    def models(self) -> Mapping[str, ServedModel]:
        return self._models

    async def start(self) -> None:
        """Start every mesh at once; if one fails, stop the others and raise its error."""
        names = list(self.meshes)
        log.info("starting %d meshes: %s", len(names), ", ".join(names))
        results = await asyncio.gather(
            *(s.start() for s in self.meshes.values()), return_exceptions=True
        )
        failed = [
            (n, r) for n, r in zip(names, results, strict=True) if isinstance(r, BaseException)
        ]
        if failed:
            await self.shutdown()
            name, err = failed[0]
            if isinstance(err, MeshStartError):
                raise err
            raise MeshStartError(f"mesh {name!r} failed to start: {err}") from err
        self._limits_from_meshes()

    def _limits_from_meshes(self) -> None:
        """Each model's dtype and context limit as its engines decided (the least over
        replicas), so the router checks requests exactly as the mesh would."""
        for name, served in self._models.items():
            limits = [
                s.client.info.models[name]
                for s in self._replicas[name]
                if s.client.info is not None and name in s.client.info.models
            ]
            if limits:
                self._models[name] = replace(
                    served,
                    dtype=limits[0].dtype,
                    max_model_len=min(lim.max_model_len for lim in limits),
                )

    # ---- requests --------------------------------------------------------------------------
    def _pick(self, model: str) -> RemoteEngineClient:
        replicas = self._replicas.get(model)
        if replicas is None:
            raise UnknownModelError(model, list(self._models))
        up = [s.client for s in replicas if s.client.connected]
        if not up:
            # the connection is the truth; the supervisor's state may lag it by a loop turn
            states = ", ".join(
                f"mesh {s.name!r} is {'down' if s.state is MeshState.OK else s.state.value}"
                for s in replicas
            )
            raise MeshUnavailableError(
                f"model {model!r} is unavailable: {states}; retry shortly", replicas[0].name
            )
        return min(up, key=lambda c: c.outstanding)

    async def add_request(
        self, model: str, prompt: list[int], params: SamplingParams, request_id: str
    ) -> str:
        client = self._pick(model)
        await client.add_request(model, prompt, params, request_id)
        self._owner[request_id] = client
        return request_id

    async def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        client = self._owner.get(request_id)
        if client is None:
            raise KeyError(f"unknown request {request_id!r} (or its outputs were read already)")
        try:
            async for out in client.stream(request_id):
                yield out
        finally:
            self._owner.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        client = self._owner.pop(request_id, None)
        if client is not None:
            client.abort(request_id)

    # ---- state -----------------------------------------------------------------------------
    async def stats(self) -> list[MeshStats]:
        async def one(s: MeshSupervisor) -> MeshStats | None:
            if not s.client.connected:
                return None
            with contextlib.suppress(Exception):
                return await s.client.stats(STATS_TIMEOUT_S)
            return None

        got = await asyncio.gather(*(one(s) for s in self.meshes.values()))
        return [g for g in got if g is not None]

    def health(self) -> Health:
        return Health({name: s.health() for name, s in self.meshes.items()})

    # ---- sleep and wake: forwarded to the meshes that list the model ---------------------
    def _listing(self, model: str) -> list[RemoteEngineClient]:
        replicas = self._replicas.get(model)
        if replicas is None:
            raise UnknownModelError(model, list(self._models))
        up = [s.client for s in replicas if s.client.connected]
        if not up:
            raise MeshUnavailableError(
                f"model {model!r} is unavailable: no mesh of it is up", replicas[0].name
            )
        return up

    async def sleep(self, model: str, level: int = 1) -> None:
        """Sleep `model` on every mesh that lists it (one mesh: `meshes[name].client.sleep`)."""
        for client in self._listing(model):
            await client.sleep(model, level)

    async def wake(self, model: str) -> float:
        """0.0 if a mesh has `model` awake; else wake it on the least loaded mesh listing it."""
        up = self._listing(model)
        if any(c.states.get(model) is ModelState.AWAKE for c in up):
            return 0.0
        return await min(up, key=lambda c: c.outstanding).wake(model)

    def model_states(self) -> dict[str, ModelState]:
        """Each model's best state over the meshes listing it (awake on one: awake)."""
        rank = [ModelState.AWAKE, ModelState.WAKING, ModelState.SLEEPING, ModelState.ASLEEP]
        out: dict[str, ModelState] = {}
        for model, replicas in self._replicas.items():
            seen = [s.client.states[model] for s in replicas if model in s.client.states]
            if seen:
                out[model] = min(seen, key=rank.index)
        return out

    async def shutdown(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.meshes.values()), return_exceptions=True)


def _served(
    name: str, path: str, dtype: str | None, max_model_len: int | None, cap: int | None
) -> ServedModel:
    """What the router needs of a model before its mesh reports: tokenizer and architecture."""
    hf = load_hf_config(path)
    limit = min(x for x in (hf.max_position_embeddings, max_model_len, cap) if x is not None)
    return ServedModel(name, Path(path), hf, Tokenizer.from_pretrained(path), dtype or "", limit)
