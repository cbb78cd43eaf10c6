"""The aiohttp application: factory, routes, and the small handlers (models, health, metrics).

The models run elsewhere — an engine loop in a thread of this process, or mesh engines in other
processes behind a router — so this event loop only parses, queues and streams: /health and
/metrics answer while the models compute.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from muxserve.client.protocol import EngineClient
from muxserve.server.admin import AdminHandlers
from muxserve.server.chat import ChatHandler
from muxserve.server.completions import CompletionsHandler
from muxserve.server.connection import ON_PROTOCOL_ERROR
from muxserve.server.context import CONTEXT, ServerContext, ServerSettings
from muxserve.server.errors import auth_middleware, error_middleware
from muxserve.server.metrics import CONTENT_TYPE, ServerMetrics
from muxserve.server.responses import ModelCard, ModelList
from muxserve.server.tokenize import TokenizerHandlers

log = logging.getLogger(__name__)


def create_app(client: EngineClient, settings: ServerSettings | None = None) -> web.Application:
    """An app serving every model of `client` behind one OpenAI-compatible endpoint.

    The app starts the client on startup (which starts its engines, if it manages them) and
    shuts it down on cleanup, after in-flight requests had their grace period.
    """
    settings = settings or ServerSettings()
    models = client.models
    metrics = ServerMetrics(
        list(models), max((m.max_model_len for m in models.values()), default=1)
    )
    ctx = ServerContext(client, metrics, settings)
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[error_middleware(metrics.on_response), auth_middleware(settings.api_key)],
        # aiohttp's keep-alive timer runs from a connection's opening (or its last answer)
        # until a request's headers are complete, so it is also the header timeout
        handler_args={
            "keepalive_timeout": settings.header_timeout,
            "lingering_time": settings.linger,
        },
    )
    app[CONTEXT] = ctx
    app[ON_PROTOCOL_ERROR] = metrics.on_protocol_error
    setup_routes(app, ctx)
    app.on_shutdown.append(_drain)
    app.on_startup.append(_start_client)
    app.on_cleanup.append(_stop_client)
    return app


def setup_routes(app: web.Application, ctx: ServerContext) -> None:
    """Every route, in one place."""
    info = InfoHandlers(ctx)
    app.router.add_get("/health", info.health)
    app.router.add_get("/metrics", info.metrics)
    app.router.add_get("/v1/models", info.list_models)
    app.router.add_get("/v1/models/{model}", info.get_model)
    admin = AdminHandlers(ctx)
    app.router.add_post("/v1/models/{model}/sleep", admin.sleep)
    app.router.add_post("/v1/models/{model}/wake", admin.wake)
    app.router.add_post("/v1/completions", CompletionsHandler(ctx).handle)
    app.router.add_post("/v1/chat/completions", ChatHandler(ctx).handle)
    tokenizers = TokenizerHandlers(ctx)
    app.router.add_post("/tokenize", tokenizers.tokenize)
    app.router.add_post("/detokenize", tokenizers.detokenize)
    app.router.add_get("/tokenizer_info", tokenizers.tokenizer_info)
    app.router.add_get("/version", tokenizers.version)


class InfoHandlers:
    """The routes that read state: models, health, metrics."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    def _card(self, name: str) -> ModelCard:
        served = self.ctx.model(name)
        return ModelCard(id=name, created=self.ctx.created, max_model_len=served.max_model_len)

    async def list_models(self, request: web.Request) -> web.Response:
        body = ModelList(data=[self._card(n) for n in self.ctx.client.models])
        return web.Response(body=body.model_dump_json(), content_type="application/json")

    async def get_model(self, request: web.Request) -> web.Response:
        card = self._card(request.match_info["model"])
        return web.Response(body=card.model_dump_json(), content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        """Every mesh's state; 200 while any model is served ("ok" or "degraded"), else 503."""
        health = self.ctx.client.health()
        status = 503 if health.status == "down" else 200
        return web.json_response(health.to_json(), status=status)

    async def metrics(self, request: web.Request) -> web.Response:
        stats = await self.ctx.client.stats()
        return web.Response(
            body=self.ctx.metrics.render(stats, self.ctx.client.health()),
            headers={"Content-Type": CONTENT_TYPE},
        )


async def _start_client(app: web.Application) -> None:
    await app[CONTEXT].client.start()


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


async def _stop_client(app: web.Application) -> None:
    """Runs after in-flight handlers finished or were cancelled: abort the rest, stop engines."""
    log.info("stopping the engines")
    await app[CONTEXT].client.shutdown()
