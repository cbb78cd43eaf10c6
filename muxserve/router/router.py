"""`Router`: the `EngineClient` in front of every mesh of a plan.

A request goes to a mesh where its model is active (`RoutingTable`); where a model is active
on several meshes, to the replica with the fewest outstanding requests. Tokenizing happens
here, once; outputs are passed on as each arrives. A request whose mesh is lost before it
gave any output is sent again to another replica of its model, if one is up (`stream`): the
client sees one answer. The router never waits on a mesh to answer `/health`. It measures
each model's rates (`WorkloadWindow`) and, with `router.replan` set, re-plans while serving
(`Replanner`), moving models by `move`: wake where it goes, switch new requests there, drain
the old place, put it to sleep there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from muxserve.client.protocol import Health, MeshState, MeshStats, ModelState
from muxserve.config import MuxConfig
from muxserve.errors import MeshStartError, MeshUnavailableError, UnknownModelError
from muxserve.mesh.remote_client import RemoteEngineClient
from muxserve.mesh.wire import new_token
from muxserve.model_descriptor import served_context
from muxserve.models.hf_config import load_hf_config
from muxserve.output_processor import RequestOutput
from muxserve.router.mesh_process import LaunchContext, Launcher
from muxserve.router.observed import WorkloadWindow
from muxserve.router.replan import Planner, Replanner
from muxserve.router.routing import RoutingTable
from muxserve.router.supervisor import MeshSupervisor, SupervisionSettings
from muxserve.sampling_params import SamplingParams
from muxserve.served_model import ServedModel
from muxserve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

STATS_TIMEOUT_S = 2.0  # a mesh slower than this to report is left out of a scrape


@dataclass
class _Routed:
    """Where a request went, and what it takes to send it again elsewhere."""

    client: RemoteEngineClient
    mesh: str
    model: str
    prompt: list[int]
    params: SamplingParams
    tried: set[str] = field(default_factory=set)  # meshes it was sent to


class Router:
    """Routes by model to the meshes of `config` (a plan), which `launcher` runs."""

    def __init__(
        self,
        config: MuxConfig,
        launcher: Launcher,
        settings: SupervisionSettings | None = None,
        planner: Planner | None = None,
    ) -> None:
        """`planner` re-plans while serving where `config.router.replan` is set (`muxserve
        serve` passes placement/replanning.py's); it is required then."""
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
        self.routing = RoutingTable(config.meshes)
        for sup in self.meshes.values():
            sup.on_back = self._restore
        cap = config.engine.max_model_len
        self._models = {
            m.name: _served(m.name, m.path, m.dtype, m.max_model_len, cap) for m in config.models
        }
        # request id -> where it went, until its last output is read
        self._owner: dict[str, _Routed] = {}
        # mesh -> requests it lost before any output and that another replica took
        self.resubmitted: Counter[str] = Counter()
        replan = config.router.replan
        self.window = WorkloadWindow(replan.window_s if replan is not None else 30.0)
        self.replanner: Replanner | None = None  # with `router.replan` set
        if replan is not None:
            if planner is None:
                raise ValueError(
                    "router.replan is set but no planner was given (muxserve serve passes "
                    "placement.replanning.PlacementPlanner)"
                )
            self.replanner = Replanner(self, replan, planner)

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
        self.window.reset()  # rates from when every mesh serves
        if self.replanner is not None:
            self.replanner.start()

    def _limits_from_meshes(self) -> None:
        """Each model's dtype and context limit as its engines decided (the least over
        replicas), so the router checks requests exactly as the mesh would."""
        for name, served in self._models.items():
            limits = [
                s.client.info.models[name]
                for s in (self.meshes[m] for m in self.routing.listed(name))
                if s.client.info is not None and name in s.client.info.models
            ]
            if limits:
                self._models[name] = replace(
                    served,
                    dtype=limits[0].dtype,
                    max_model_len=min(lim.max_model_len for lim in limits),
                )

    # ---- requests --------------------------------------------------------------------------
    def _pick(self, model: str) -> MeshSupervisor:
        if model not in self._models:
            raise UnknownModelError(model, list(self._models))
        up = self._up_replicas(model)
        if not up:
            replicas = [self.meshes[m] for m in self.routing.targets(model)]
            states = ", ".join(
                f"mesh {s.name!r} is {'down' if s.state is MeshState.OK else s.state.value}"
                for s in replicas
            )
            raise MeshUnavailableError(
                f"model {model!r} is unavailable: {states}; retry shortly", replicas[0].name
            )
        return up[0]

    def _up_replicas(self, model: str, exclude: Collection[str] = ()) -> list[MeshSupervisor]:
        """The meshes taking `model`'s new requests that are connected (the connection is the
        truth; the supervisor's state may lag it by a loop turn), fewest outstanding first."""
        up = [
            self.meshes[m]
            for m in self.routing.targets(model)
            if m not in exclude and self.meshes[m].client.connected
        ]
        return sorted(up, key=lambda s: s.client.outstanding)

    async def add_request(
        self, model: str, prompt: list[int], params: SamplingParams, request_id: str
    ) -> str:
        mesh = self._pick(model)
        routed = _Routed(mesh.client, mesh.name, model, prompt, params, {mesh.name})
        try:
            await self._send(mesh, model, prompt, params, request_id)
        except MeshUnavailableError as e:  # lost while it took the request: try another
            if not await self._resubmit(request_id, routed, e, counted=False):
                raise
        self._owner[request_id] = routed
        self.window.arrived(model, len(prompt))
        return request_id

    async def _send(
        self,
        mesh: MeshSupervisor,
        model: str,
        prompt: list[int],
        params: SamplingParams,
        request_id: str,
    ) -> None:
        # counted in flight before the mesh is asked: a move's drain of this mesh waits for it
        self.routing.begin(mesh.name, model)
        try:
            await mesh.client.add_request(model, prompt, params, request_id)
        except BaseException:
            self.routing.end(mesh.name, model)
            raise

    async def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """The request's outputs as they arrive. Its mesh lost before the first output (the
        process died, the connection dropped; or while it took the request, in
        `add_request`), the request goes to another replica of its
        model that is up and was not tried yet, with the same prompt and parameters, so the
        caller sees one whole answer. Once an output was passed on it is not sent again (the
        continuation would not be the same request: penalties, seeds, stop strings over the
        seam), and `MeshUnavailableError` ends the stream, as with no replica left."""
        routed = self._owner.get(request_id)
        if routed is None:
            raise KeyError(f"unknown request {request_id!r} (or its outputs were read already)")
        passed_on = False
        try:
            while True:
                try:
                    async for out in routed.client.stream(request_id):
                        if out.finished:
                            self.window.finished(routed.model, out.completion_tokens)
                        passed_on = True
                        yield out
                    return
                except MeshUnavailableError as e:
                    if passed_on or not await self._resubmit(request_id, routed, e):
                        raise
        finally:
            self._done(request_id)

    async def _resubmit(
        self, request_id: str, routed: _Routed, err: Exception, counted: bool = True
    ) -> bool:
        """Send `request_id` to a replica it has not been to; False if none is up or takes it.
        `counted`: the lost mesh still counts it in flight (it had taken it)."""
        lost = routed.mesh
        for mesh in self._up_replicas(routed.model, exclude=routed.tried):
            name = mesh.name
            routed.tried.add(name)
            try:
                await self._send(mesh, routed.model, routed.prompt, routed.params, request_id)
            except MeshUnavailableError:
                continue
            if counted:
                self.routing.end(lost, routed.model)
            routed.client, routed.mesh = mesh.client, name
            self.resubmitted[lost] += 1
            log.warning(
                "request %s: mesh %r was lost before any output (%s); sent to mesh %r",
                request_id,
                lost,
                err,
                name,
            )
            return True
        return False

    def abort(self, request_id: str) -> None:
        routed = self._owner.get(request_id)
        if routed is not None:
            self._done(request_id)
            routed.client.abort(request_id)

    def _done(self, request_id: str) -> None:
        routed = self._owner.pop(request_id, None)
        if routed is not None:
            self.routing.end(routed.mesh, routed.model)

    # ---- moving a model --------------------------------------------------------------------
    async def move(self, model: str, src: str | None, dst: str | None, reason: str) -> None:
        """Move `model`'s new requests from mesh `src` to mesh `dst` without failing any.

        Wake it on `dst` (nothing changes if that fails), route new requests there, wait for
        those in flight on `src` to finish (at most the drain timeout), then put it to sleep
        on `src`. Either end may be None: only wake and add `dst`, or only drain and sleep
        `src` (never the model's last active mesh). A `dst` that does not list the model
        gets it added first (`add_model`); a `src` it was added to (or any `src`, with
        `router.replan.add_models`) is left without it (`remove_model`), not as a standby.
        """
        log.info("moving %s: %s -> %s (%s)", model, src or "-", dst or "-", reason)
        if dst is not None:
            if dst in self.routing.listed(model):
                took = await self.meshes[dst].client.wake(model)
            else:
                took = await self.add_model(model, dst)
            self.routing.activate(model, dst)
            log.info("%s awake on %s after %.2f s; new requests go there", model, dst, took)
        if src is None:
            return
        if self.routing.active(model) == [src]:
            raise ValueError(f"{model} is active only on {src}: it has nowhere else to go")
        self.routing.deactivate(model, src)
        replan = self.config.router.replan
        timeout = replan.drain_timeout_s if replan is not None else 300.0
        if not await self.routing.drained(src, model, timeout):
            log.warning(
                "%s: requests still in flight on %s after %.0f s; left awake there",
                model,
                src,
                timeout,
            )
            return
        # a mesh it was added to, or any with add_models on, is left without it (not standby)
        if self.routing.added(model, src) or (replan is not None and replan.add_models):
            await self.remove_model(model, src)
            return
        await self.meshes[src].client.sleep(model)
        log.info("%s asleep on %s (drained)", model, src)

    async def add_model(self, model: str, mesh: str, wake: bool = True) -> float:
        """Serve `model` on `mesh`, which does not list it: the mesh loads it (asleep, then
        woken with `wake`) within its weights budget, or refuses (ModelDoesNotFitError) and
        stays as it was. Listed there from now on, not active (see `move`). The seconds
        the wake took."""
        if model not in self._models:
            raise UnknownModelError(model, list(self._models))
        client = self.meshes[mesh].client
        took = await client.add_model(self.config.model(model), wake)
        self.routing.list_added(model, mesh)
        self._limits_from_meshes()
        log.info("%s added to %s (woken in %.2f s)", model, mesh, took)
        return took

    async def _restore(self, mesh: MeshSupervisor) -> None:
        """A mesh restarted with its plan's models: add back (asleep) those added while
        serving, so its listings hold; one that cannot come back is unlisted (if inactive)."""
        for model in self.routing.added_on(mesh.name):
            try:
                await mesh.client.add_model(self.config.model(model), wake=False)
            except Exception as e:
                log.error("%s: not restored on %s after its restart: %s", model, mesh.name, e)
                if mesh.name not in self.routing.active(model):
                    self.routing.unlist(model, mesh.name)

    async def remove_model(self, model: str, mesh: str) -> None:
        """Take `model` off `mesh` (not active there, drained: ModelBusyError otherwise)."""
        if mesh in self.routing.active(model):
            raise ValueError(f"{model} is active on {mesh}: move it away first")
        await self.meshes[mesh].client.remove_model(model)
        self.routing.unlist(model, mesh)
        log.info("%s removed from %s (drained)", model, mesh)

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
        return Health(
            {
                name: replace(s.health(), resubmitted=self.resubmitted[name])
                for name, s in self.meshes.items()
            }
        )

    # ---- sleep and wake: forwarded to the meshes that list the model ---------------------
    def _listing(self, model: str) -> list[RemoteEngineClient]:
        if model not in self._models:
            raise UnknownModelError(model, list(self._models))
        replicas = [self.meshes[m] for m in self.routing.listed(model)]
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
        for model in self.routing.models:
            replicas = [self.meshes[m] for m in self.routing.listed(model)]
            seen = [s.client.states[model] for s in replicas if model in s.client.states]
            if seen:
                out[model] = min(seen, key=rank.index)
        return out

    async def shutdown(self) -> None:
        if self.replanner is not None:
            await self.replanner.stop()
        await asyncio.gather(*(s.stop() for s in self.meshes.values()), return_exceptions=True)


def _served(
    name: str, path: str, dtype: str | None, max_model_len: int | None, cap: int | None
) -> ServedModel:
    """What the router needs of a model before its mesh reports: tokenizer and architecture."""
    hf = load_hf_config(path)
    limit = served_context(name, hf, (max_model_len, cap))
    return ServedModel(name, Path(path), hf, Tokenizer.from_pretrained(path), dtype or "", limit)
