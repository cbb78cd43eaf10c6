"""The aiohttp application: factory, routes, and the small handlers (models, health, metrics).

The engine's loop runs in its own thread (`engine.start()`), so this event loop only parses,
queues and streams: /health and /metrics answer while the models compute.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from muxserve.engine import MuxEngine
from muxserve.server.chat import ChatHandler
from muxserve.server.completions import CompletionsHandler
from muxserve.server.context import CONTEXT, ServerContext, ServerSettings
from muxserve.server.errors import auth_middleware, error_middleware
from muxserve.server.metrics import CONTENT_TYPE, ServerMetrics
from muxserve.server.responses import ModelCard, ModelList

log = logging.getLogger(__name__)


def create_app(
    engine: MuxEngine, settings: ServerSettings | None = None, *, manage_engine: bool = True
) -> web.Application:
    """An app serving every model of `engine` behind one OpenAI-compatible endpoint.

    With `manage_engine` the app starts the engine's loop on startup and shuts the engine
    down on cleanup; without, the caller does (tests share one engine between apps).
    """
    settings = settings or ServerSettings()
    metrics = ServerMetrics(engine)
    ctx = ServerContext(engine, metrics, settings)
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[error_middleware(metrics.on_response), auth_middleware(settings.api_key)],
    )
    app[CONTEXT] = ctx
    setup_routes(app, ctx)
    app.on_shutdown.append(_drain)
    if manage_engine:
        app.on_startup.append(_start_engine)
        app.on_cleanup.append(_stop_engine)
    return app


def setup_routes(app: web.Application, ctx: ServerContext) -> None:
    """Every route, in one place."""
    info = InfoHandlers(ctx)
    app.router.add_get("/health", info.health)
    app.router.add_get("/metrics", info.metrics)
    app.router.add_get("/v1/models", info.list_models)
    app.router.add_get("/v1/models/{model}", info.get_model)
    app.router.add_post("/v1/completions", CompletionsHandler(ctx).handle)
    app.router.add_post("/v1/chat/completions", ChatHandler(ctx).handle)


class InfoHandlers:
    """The routes that read state: models, health, metrics."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    def _card(self, name: str) -> ModelCard:
        served = self.ctx.model(name)
        return ModelCard(id=name, created=self.ctx.created, max_model_len=served.max_model_len)

    async def list_models(self, request: web.Request) -> web.Response:
        body = ModelList(data=[self._card(n) for n in self.ctx.engine.models])
        return web.Response(body=body.model_dump_json(), content_type="application/json")

    async def get_model(self, request: web.Request) -> web.Response:
        card = self._card(request.match_info["model"])
        return web.Response(body=card.model_dump_json(), content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        """200 while the engine's loop runs; 503 if it has stopped (nothing would be served)."""
        if self.ctx.engine.is_running:
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "engine not running"}, status=503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.ctx.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def _start_engine(app: web.Application) -> None:
    app[CONTEXT].engine.start()


async def _drain(app: web.Application) -> None:
    """On shutdown (no new connections by now): give in-flight requests the grace period,
    then abort the rest, whose clients get a 503 (or a last error event) rather than a cut."""
    ctx = app[CONTEXT]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ctx.settings.shutdown_grace
    if ctx.active:
        log.info(
            "waiting up to %.1fs for %d requests", ctx.settings.shutdown_grace, len(ctx.active)
        )
    while ctx.active and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if ctx.active:
        log.info("aborting %d requests", len(ctx.active))
    for gen in list(ctx.active):
        gen.close()


async def _stop_engine(app: web.Application) -> None:
    """Runs after in-flight handlers finished or were cancelled: abort the rest, stop the loop."""
    log.info("stopping the engine")
    await asyncio.to_thread(app[CONTEXT].engine.shutdown)
